"""One key for the shape suffixes used in names across jaxlin.

    N  examples (rows of a kernel)          M  evaluation examples
    O  outputs per example (logits)         P  trainable parameters
    L  tokens                               D  model width
    B  batch                                V  vocabulary
    R  LoRA rank                            T  time steps / iterations
    K  grid points (e.g. ridge values)

Full kernels follow neural-tangents: `gram_NNOO` is (N1, N2, O, O) with entry [i, j, a, b] = ⟨∂f_a(x_i), ∂f_b(x_j)⟩;
flattened example-major it is the (N·O, N·O) matrix with row i·O + a. `gram_NN` is a traced (N, N) kernel,
`jac_NOP` a Jacobian.
"""
from typing import Any, Mapping

import jax

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Any]  # at least "input_ids" (B, L) int and "attention_mask" (B, L) {0,1}
