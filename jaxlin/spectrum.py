"""Spectral statistics of NTK Gram matrices (docs/paper.md §5.1, §5.2).

Dense statistics use one float64 eigendecomposition in numpy (kernels here are small: N·O ≈ 64); the
matrix-free estimates (`lanczos_extreme_eigenvalues`, `hutchinson_trace`) take an NTK-vector product and
are pure JAX, so they jit and run on an accelerator.

Kernels are (n, n) traced or (N, N, O, O) full; a full kernel is read example-major,
gram[i, j, c, d] → row i·O + c, column j·O + d (see `as_matrix`).

Eigenvalue clip policy: eigenvalues and mu_min are reported as computed, so a PSD kernel may show
tiny negative round-off values; κ uses them unclipped (κ = inf when μ_min + σ ≤ 0); effective rank, stable
rank and cumulative energy use max(μ, 0).

Naming: κ is `kappa` (σ = 0), κ_σ = (μ_max + σ)/(μ_min + σ) is `kappa_sigma*` and the extreme eigenvalues are
`mu_max`/`mu_min` everywhere, in these dicts and in results.json. `kernel_statistics` is the one set of named statistics that the spectrum stage, the study
and the report read.

σ convention: σ is absolute (kernel units) or, with sigma_scale="trace", a multiple of the mean eigenvalue
trace(K)/n. Kernel scale grows with the number of modules summed (K_S = Σ K_m), so a fixed absolute σ (the
paper's 1e-4, docs/paper.md §5.1) regularises large configurations relatively less than small ones; the
trace-relative σ is scale-fair and is jaxlin's default for selection (`DEFAULT_SIGMA_SCALE`), the absolute
one an explicit option.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_SCALES = ("absolute", "trace")
PAPER_ABSOLUTE_SIGMA = 1e-4  # the paper's reported fixed σ (docs/paper.md §5.1)
PAPER_TRACE_SIGMAS = (0.0, 1e-6, 1e-4, 1e-2)  # × trace(K)/n, the scale-fair grid of docs/paper.md §5.1
DEFAULT_SIGMA_SCALE = "trace"  # scale-fair (module docstring); "absolute" is the paper's convention
DEFAULT_SIGMA_TRACE = 1e-4  # σ = 1e-4·trace(K)/n: the paper's 1e-4, relative to the mean eigenvalue
DEFAULT_RIDGE_TRACE = 1e-4  # ridge λ of the ridge objective, × trace(K)/n
KERNELS = ("ntk", "sign")
STATISTICS = ("kappa", "kappa_sigma_abs", "kappa_sigma_trace", "mu_min", "mu_max", "trace", "effective_rank",
              "stable_rank", "ridge_objective", "kappa_traced")


def as_matrix(gram):
    """Return `gram` as a float64 numpy (n, n) matrix.

    (n, n) is taken as is; (N, N, O, O) is transposed to (N, O, N, O) and reshaped to (N·O, N·O), so row
    i·O + c is output c of example i. Raises ValueError for other shapes or non-finite entries.
    """
    mat = np.asarray(gram, dtype=np.float64)
    if mat.ndim == 4:
        n_ex, n_ex2, n_out, n_out2 = mat.shape
        if n_ex != n_ex2 or n_out != n_out2:
            raise ValueError(
                f"a 4-D kernel must have shape (N, N, O, O), got {mat.shape}; "
                "for an (N, O, N, O) kernel pass gram.reshape(N*O, N*O) instead")
        mat = mat.transpose(0, 2, 1, 3).reshape(n_ex * n_out, n_ex * n_out)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
        raise ValueError(f"kernel must be (n, n) or (N, N, O, O) with n ≥ 1, got shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise ValueError("kernel has non-finite entries (nan/inf); recompute it in float64 or check the inputs")
    return mat


def absolute_sigma(sigma, sigma_scale, trace, n):
    """σ_abs = σ ("absolute") or σ·trace/n ("trace", the mean eigenvalue); σ must be finite and ≥ 0."""
    if sigma_scale not in SIGMA_SCALES:
        raise ValueError(f"sigma_scale={sigma_scale!r}; use one of {SIGMA_SCALES}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma={sigma} must be finite and ≥ 0")
    return sigma * trace / n if sigma_scale == "trace" else sigma


def kappa(top, bottom, sigma):
    """κ_σ = (top + σ)/(bottom + σ); inf when bottom + σ ≤ 0 (singular or round-off negative)."""
    den = bottom + sigma
    return float((top + sigma) / den) if den > 0 else math.inf


def _value_stats(values_desc, sigma_abs):
    """Statistics shared by eigenvalues and singular values (descending, float64)."""
    clipped = np.clip(values_desc, 0.0, None)
    total = float(clipped.sum())
    top = float(values_desc[0])
    if total > 0:
        p = clipped / total
        p_pos = p[p > 0]
        effective_rank = float(np.exp(-np.sum(p_pos * np.log(p_pos))))
        cumulative = np.cumsum(p)
    else:
        effective_rank = math.nan
        cumulative = np.full_like(clipped, math.nan)
    return {
        "kappa_sigma": kappa(top, float(values_desc[-1]), sigma_abs),
        "sigma": sigma_abs,
        "effective_rank": effective_rank,
        "stable_rank": total / top if top > 0 else math.nan,
        "cumulative_energy": cumulative,
        "n": int(values_desc.shape[0]),
    }


def _asymmetry(mat):
    norm = np.linalg.norm(mat)
    return float(np.linalg.norm(mat - mat.T) / norm) if norm > 0 else 0.0


def spectrum_stats(gram, sigma=0.0, *, sigma_scale="absolute"):
    """Spectral statistics of a symmetric kernel K (n × n after `as_matrix`).

    K is symmetrised, (K + Kᵀ)/2, before a float64 eigh; `asymmetry` = ‖K − Kᵀ‖_F/‖K‖_F says how much that
    changed. With μ_1 ≥ … ≥ μ_n and σ_abs from `absolute_sigma`:
      mu_max = μ_1, mu_min = μ_n (the names of `kernel_statistics` and results.json),
      kappa_sigma κ_σ = (μ_max + σ)/(μ_min + σ)   (inf when μ_min + σ ≤ 0; κ itself at σ = 0)
      trace = Σ μ_i,  stable_rank = Σ μ_i⁺/μ_max,  effective_rank = exp(H(p)), p = μ⁺/Σ μ⁺,
      cumulative_energy = cumsum(p),  with μ⁺ = max(μ, 0) (nan when Σ μ⁺ = 0 or μ_max ≤ 0).
    Eigenvalues are not clipped (module docstring); `num_negative` counts those below 0.
    """
    mat = as_matrix(gram)
    eigvals_n = np.linalg.eigvalsh(0.5 * (mat + mat.T))[::-1].copy()
    n = mat.shape[0]
    trace = float(np.trace(mat))
    sigma_abs = absolute_sigma(sigma, sigma_scale, trace, n)
    return {
        "eigenvalues": eigvals_n,
        "mu_max": float(eigvals_n[0]),
        "mu_min": float(eigvals_n[-1]),
        "trace": trace,
        "num_negative": int(np.sum(eigvals_n < 0)),
        "asymmetry": _asymmetry(mat),
        "sigma_scale": sigma_scale,
        **_value_stats(eigvals_n, sigma_abs),
    }


def sign_kernel_stats(gram_sign, sigma=0.0, *, sigma_scale="absolute"):
    """Statistics of the asymmetric sign kernel K_s = J·sign(J)ᵀ (docs/paper.md §5.2), from its singular values.

    K_s is not symmetric (its eigenvalues can be complex), so with s_1 ≥ … ≥ s_n its singular values:
      kappa_sigma = (s_max + σ)/(s_min + σ), stable_rank = Σ s/s_max, effective_rank = exp(H(s/Σ s)),
      nuclear_norm = Σ s; σ_abs for sigma_scale="trace" is σ·nuclear_norm/n (= σ·trace/n for a PSD kernel).
    Also reported: `trace` (of K_s itself), `asymmetry` ‖K_s − K_sᵀ‖_F/‖K_s‖_F and `symmetric_eigenvalues`,
    the descending eigenvalues of (K_s + K_sᵀ)/2.
    """
    mat = as_matrix(gram_sign)
    singular_n = np.linalg.svd(mat, compute_uv=False)  # numpy returns them descending
    n = mat.shape[0]
    nuclear = float(singular_n.sum())
    sigma_abs = absolute_sigma(sigma, sigma_scale, nuclear, n)
    return {
        "singular_values": singular_n,
        "max_singular_value": float(singular_n[0]),
        "min_singular_value": float(singular_n[-1]),
        "nuclear_norm": nuclear,
        "trace": float(np.trace(mat)),
        "asymmetry": _asymmetry(mat),
        "symmetric_eigenvalues": np.linalg.eigvalsh(0.5 * (mat + mat.T))[::-1].copy(),
        "sigma_scale": sigma_scale,
        **_value_stats(singular_n, sigma_abs),
    }


def condition_numbers(gram, sigmas=PAPER_TRACE_SIGMAS, *, sigma_scale="trace"):
    """κ_σ = (μ_max + σ)/(μ_min + σ) for every σ in `sigmas`, from one eigendecomposition.

    Returns {"sigmas": given grid, "sigma_absolute": σ_abs per entry, "kappa_sigma": κ_σ per entry,
    "sigma_scale"}. The paper's grids: `PAPER_TRACE_SIGMAS` with sigma_scale="trace", and
    (`PAPER_ABSOLUTE_SIGMA`,) with sigma_scale="absolute".
    """
    stats = spectrum_stats(gram)
    sigmas_k = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    sigma_abs_k = np.array([absolute_sigma(s, sigma_scale, stats["trace"], stats["n"]) for s in sigmas_k])
    kappa_k = np.array([kappa(stats["mu_max"], stats["mu_min"], s) for s in sigma_abs_k])
    return {"sigmas": sigmas_k, "sigma_absolute": sigma_abs_k, "kappa_sigma": kappa_k,
            "sigma_scale": sigma_scale}


def kernel_statistics(gram_NNOO, resid0_NO=None, *, kernel: str = "ntk", sigma_absolute: float = PAPER_ABSOLUTE_SIGMA,
                      sigma_trace: float = DEFAULT_SIGMA_TRACE, ridge_trace: float = DEFAULT_RIDGE_TRACE) -> dict:
    """The named `STATISTICS` of one kernel, the one set the spectrum stage, the study and the report read.

    On the (N·O × N·O) example-major matrix of a full (N, N, O, O) kernel (or an (n, n) one), μ its eigenvalues
    ("ntk") or singular values ("sign", `sign_kernel_stats`), descending, n = N·O:
      kappa μ_max/μ_min (σ = 0); kappa_sigma_abs (μ_max+σ)/(μ_min+σ), σ = sigma_absolute; kappa_sigma_trace the
      same with σ = sigma_trace·Σμ/n (both conventions, module docstring); mu_min; mu_max; trace Σμ;
      effective_rank exp(H(μ⁺/Σμ⁺)); stable_rank Σμ⁺/μ_max; ridge_objective ½λ r0ᵀ(K+λI)⁻¹r0 with
      λ = ridge_trace·trace(K)/n and r0 = resid0_NO flattened example-major (only with resid0_NO and
      kernel="ntk"); kappa_traced κ of the (N × N) kernel summed over outputs.
    Returns {name: float}; κ's are inf when the denominator is ≤ 0.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    mat = as_matrix(gram_NNOO)
    n = mat.shape[0]
    traced_NN = np.einsum("ijaa->ij", np.asarray(gram_NNOO, np.float64)) if np.ndim(gram_NNOO) == 4 else mat
    if kernel == "ntk":
        st, st_traced = spectrum_stats(mat), spectrum_stats(traced_NN)
        top, bottom, total = st["mu_max"], st["mu_min"], st["trace"]
        kappa_traced = kappa(st_traced["mu_max"], st_traced["mu_min"], 0.0)
    else:
        st, st_traced = sign_kernel_stats(mat), sign_kernel_stats(traced_NN)
        top, bottom, total = st["max_singular_value"], st["min_singular_value"], st["nuclear_norm"]
        kappa_traced = kappa(st_traced["max_singular_value"], st_traced["min_singular_value"], 0.0)
    out = {"kappa": kappa(top, bottom, 0.0),
           "kappa_sigma_abs": kappa(top, bottom, absolute_sigma(sigma_absolute, "absolute", total, n)),
           "kappa_sigma_trace": kappa(top, bottom, absolute_sigma(sigma_trace, "trace", total, n)),
           "mu_min": bottom, "mu_max": top, "trace": total, "effective_rank": st["effective_rank"],
           "stable_rank": st["stable_rank"]}
    if kernel == "ntk" and resid0_NO is not None:
        out["ridge_objective"] = ridge_terms(0.5 * (mat + mat.T), resid0_NO, ridge_trace * total / n)[0]
    out["kappa_traced"] = kappa_traced
    return out


def ridge_terms(gram, resid0, ridge: float) -> tuple[float, float]:
    """(½λ r0ᵀ(K+λI)⁻¹r0, ‖λ(K+λI)⁻¹r0‖) for λ = ridge and r0 = resid0 flattened example-major (docs/paper.md
    §6.3): the ridge objective (the score of greedy selection and the `ridge_objective` statistic) and the norm
    of the ridge residual. K = `as_matrix(gram)` is used as given; `kernel_statistics` symmetrises it first."""
    mat = as_matrix(gram)
    r0 = np.asarray(resid0, np.float64).reshape(-1)
    if r0.shape[0] != mat.shape[0]:
        raise ValueError(f"resid0 has {r0.shape[0]} entries but the kernel is {mat.shape[0]}×{mat.shape[0]}; "
                         "flatten (N, O) residuals example-major to N·O entries")
    alpha = np.linalg.solve(mat + ridge * np.eye(mat.shape[0]), r0)
    return 0.5 * ridge * float(r0 @ alpha), float(np.linalg.norm(ridge * alpha))


def _check_iters(name, value, low, high):
    if not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high}]")


def lanczos_extreme_eigenvalues(matvec, n, *, num_iters, key, dtype=None):
    """(μ_max, μ_min) estimates of a symmetric K given only v ↦ K v, by Lanczos with full reorthogonalisation.

    Builds an orthonormal Krylov basis V (num_iters × n) and the tridiagonal T = V K Vᵀ (α on the diagonal,
    β off it); the extreme eigenvalues of T bound and approximate those of K (μ_min(K) ≤ μ_min(T),
    μ_max(T) ≤ μ_max(K), exact once num_iters = n). Each new vector is orthogonalised twice against all
    previous ones. On breakdown (β ≤ √eps·max|T|, an invariant subspace was found) a fresh random vector
    orthogonal to V continues the basis with β = 0 (T = V K Vᵀ up to that dropped β).
    Pure JAX: jit with `matvec`, `n`, `num_iters` static. Returns two scalars of the working dtype
    (default: JAX's default float).
    """
    _check_iters("n", n, 1, np.iinfo(np.int64).max)
    _check_iters("num_iters", num_iters, 1, n)
    dtype = jnp.result_type(float) if dtype is None else dtype
    eps = jnp.finfo(dtype).eps
    start_key, restart_key = jax.random.split(key)
    v0 = jax.random.normal(start_key, (n,), dtype)
    basis = jnp.zeros((num_iters + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def orthogonalise(w, basis):
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(j, carry):
        basis, alphas, betas, scale = carry
        v = basis[j]
        w = jnp.asarray(matvec(v), dtype)
        alpha = jnp.dot(v, w)
        w = orthogonalise(w, basis)  # removes α v_j, β v_{j-1} and any drift, in one pass
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        broke = beta <= jnp.sqrt(eps) * scale
        fresh = orthogonalise(jax.random.normal(jax.random.fold_in(restart_key, j), (n,), dtype), basis)
        nxt = jnp.where(broke, fresh / jnp.linalg.norm(fresh), w / jnp.where(broke, 1.0, beta))
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(broke, 0.0, beta)), scale

    init = (basis, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype), jnp.zeros((), dtype))
    _, alphas, betas, _ = jax.lax.fori_loop(0, num_iters, step, init)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz = jnp.linalg.eigvalsh(tri)
    return ritz[-1], ritz[0]


def hutchinson_trace(matvec, n, *, num_samples, key, dtype=None):
    """Hutchinson estimate of trace(K) = E[zᵀ K z], z Rademacher, and its standard error std(zᵀKz)/√m.

    `matvec` is vmapped over the `num_samples` probes (≥ 2, for the standard error). Pure JAX; jit with
    `matvec`, `n`, `num_samples` static. Returns (estimate, standard_error) as scalars.
    """
    _check_iters("n", n, 1, np.iinfo(np.int64).max)
    _check_iters("num_samples", num_samples, 2, np.iinfo(np.int64).max)
    dtype = jnp.result_type(float) if dtype is None else dtype
    probes = jax.random.rademacher(key, (num_samples, n), dtype)
    quad = jnp.sum(probes * jax.vmap(matvec)(probes), axis=1)
    return jnp.mean(quad), jnp.std(quad, ddof=1) / jnp.sqrt(num_samples)
