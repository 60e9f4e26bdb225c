"""The primal solve of the regularized linearized problem against KRR on the dense eNTK (docs/scaling.md).

A tiny RoBERTa (2 layers, O = 3) in float64 with LoRA rank 2 on query/value and the head; N = 13 training
examples, 5 held-out ones. The reference is `kernel_ridge` on K = J Jᵀ from a dense jacrev: predictions
J(x)δ* = K(x, X)(K + λI)⁻¹ r0 at the training and the held-out points.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlin import solve
from jaxlin.adapters import add_lora
from jaxlin.primal import primal_ridge
from jaxlin.testing import random_batch, tiny_model
from jaxlin.train import model_functions

N, N_EVAL, O = 13, 5, 3


@pytest.fixture(scope="module")
def adapted():
    model = tiny_model("roberta", task="classification", num_labels=O, num_hidden_layers=2, dtype=jnp.float64)
    return add_lora(model, targets=("query", "value"), rank=2, head=True)


def _batch(model, n, seed):
    batch = random_batch(model, batch=n, length=11, seed=seed)
    labels = np.random.default_rng(seed).integers(0, O, n).astype(np.int32)
    return {**batch, "labels": labels, "example_mask": np.ones(n, np.float32)}


def _rows(batch, start, stop):
    return {k: v[start:stop] for k, v in batch.items()}


@pytest.fixture(scope="module")
def problem(adapted):
    """(f, train batch, eval batch, λ, dense reference of Jδ* at the train then the eval rows)."""
    f, _ = model_functions(adapted)
    train, held = _batch(adapted.model, N, 0), _batch(adapted.model, N_EVAL, 1)
    flat0, unravel = ravel_pytree(adapted.trainable)
    jacobian = jax.jit(jax.jacrev(lambda p, b: f(unravel(p), b)))  # one compile per shape, not op-by-op dispatch
    jac = lambda b: np.asarray(jacobian(flat0, b)).reshape(-1, flat0.size)  # noqa: E731
    jac_tr, jac_ev = jac(train), jac(held)
    gram = jac_tr @ jac_tr.T
    lam = 1e-2 * np.trace(gram) / gram.shape[0]
    resid0 = np.eye(O)[train["labels"]] - np.asarray(jax.jit(f)(adapted.trainable, train))
    krr = solve.kernel_ridge(gram, resid0.reshape(-1), lam)
    assert krr.status == "ok", krr.message
    want = np.concatenate([gram @ krr.value, jac_ev @ jac_tr.T @ krr.value]).reshape(-1, O)
    return f, train, held, lam, want


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_primal_ridge_equals_kernel_ridge_on_the_dense_entk(adapted, problem):
    f, train, held, lam, want = problem
    sol = primal_ridge(f, adapted.trainable, [train], lam, tol=1e-10, eval_batches=[train, held])
    assert sol.status == "ok", sol.message
    assert float(sol.residual) <= 1e-10 and 0 < int(sol.iterations) <= 200
    assert _rel(sol.change, want) <= 1e-6, _rel(sol.change, want)
    f0 = np.concatenate([np.asarray(f(adapted.trainable, b)) for b in (train, held)])
    np.testing.assert_allclose(sol.predictions, f0 + sol.change, rtol=1e-12)
    # the linearized apply function has the same Jacobian at θ0: the same δ
    _, f_lin = model_functions(adapted)
    lin = primal_ridge(f_lin, adapted.trainable, [train], lam, tol=1e-10)
    assert _rel(ravel_pytree(lin.value)[0], ravel_pytree(sol.value)[0]) <= 1e-8


def test_uneven_streamed_batches_give_the_one_batch_answer_and_compile_once(adapted, problem):
    f, train, held, lam, want = problem
    traces = []

    def counted(trainable, batch):
        traces.append(1)
        return f(trainable, batch)

    pieces = lambda: [_rows(train, 0, 5), _rows(train, 5, 7), _rows(train, 7, N)]  # noqa: E731
    sol = primal_ridge(counted, adapted.trainable, pieces, lam, tol=1e-10, eval_batches=[train, held])
    assert sol.status == "ok", sol.message
    assert _rel(sol.change, want) <= 1e-6, _rel(sol.change, want)
    first = len(traces)
    again = primal_ridge(counted, adapted.trainable, pieces, lam, tol=1e-10, eval_batches=[train, held])
    assert len(traces) == first, f"a second solve traced the model {len(traces) - first} more times"
    np.testing.assert_allclose(again.change, sol.change, rtol=1e-12)


def test_max_iters_reached_is_reported_with_what_to_try(adapted, problem):
    f, train, _, lam, _ = problem
    sol = primal_ridge(f, adapted.trainable, [train], lam, tol=1e-10, max_iters=2)
    assert sol.status == "not_converged" and int(sol.iterations) == 2
    assert float(sol.residual) > 1e-10 and "max_iters=4" in sol.message, sol.message


def test_breakdown_names_the_primal_operator():
    """Negative row weights make JᵀWJ + λI indefinite: CG breaks down, and says which system it solved."""
    f = lambda theta, batch: batch["input_ids"].astype(theta["w"].dtype) @ theta["w"]  # noqa: E731
    ids = np.arange(1, 29, dtype=np.int32).reshape(7, 4) % 5
    batch = {"input_ids": ids, "labels": np.arange(7, dtype=np.int32) % O, "example_mask": -np.ones(7, np.float32)}
    sol = primal_ridge(f, {"w": jnp.zeros((4, O))}, [batch], 1e-3)
    assert sol.status == "not_psd" and "pᵀ(JᵀJ+λI)p ≤ 0" in sol.message, sol.message


def test_bad_arguments_are_refused_in_one_line(adapted, problem):
    f, train, _, lam, _ = problem
    for kwargs, match in [(dict(ridge=0.0), "ridge=0.0"), (dict(ridge=lam, tol=-1.0), "tol=-1.0"),
                          (dict(ridge=lam, max_iters=0), "max_iters=0")]:
        with pytest.raises(ValueError, match=match):
            primal_ridge(f, adapted.trainable, [train], **kwargs)
    with pytest.raises(ValueError, match="one-shot iterator"):
        primal_ridge(f, adapted.trainable, iter([train]), lam)


@pytest.mark.slow  # MeshPlan's batches and shardings are checked fast by test_train_mesh
@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (4, 2)])
def test_on_a_mesh_equals_one_device(adapted, problem, shape):
    """Meshes over ("data", "model"): 13 rows padded to 16 (example_mask 0) over "data", the 2-D trainable
    leaves whose width divides sharded over "model"; δ keeps θ0's shardings and gives KRR's predictions. (No leaf
    of this model has a width divisible by 8, so (1, 8) would shard nothing.)"""
    f, train, held, lam, want = problem
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))

    def spec(x):
        return P(None, "model") if x.ndim == 2 and x.shape[1] % shape[1] == 0 else P()

    theta0 = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), adapted.trainable)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(theta0)) == (shape[1] > 1)
    pad = _batch(adapted.model, 16 - N, 2)
    padded = {k: np.concatenate([train[k], pad[k]]) for k in train}
    padded["example_mask"][N:] = 0
    held_padded = {k: np.concatenate([held[k], _rows(pad, 0, 3)[k]]) for k in held}  # 8 rows split over 4
    sol = primal_ridge(f, theta0, [padded], lam, tol=1e-10, eval_batches=[padded, held_padded], mesh=mesh)
    assert sol.status == "ok", sol.message
    change = np.concatenate([sol.change[:N], sol.change[16:16 + N_EVAL]])
    assert _rel(change, want) <= 1e-6, _rel(change, want)
    for leaf, leaf0 in zip(jax.tree.leaves(sol.value), jax.tree.leaves(theta0)):
        assert leaf.sharding.is_equivalent_to(leaf0.sharding, leaf.ndim)
