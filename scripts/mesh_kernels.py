"""Per-module kernels and logits of a tiny random model on a (data, model) mesh, on one process or several.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        scripts/launch_local.sh 2 -- python scripts/mesh_kernels.py --mesh data=2,model=2 --out kernels.npz

Every process joins the run (`jaxlin.distributed.initialize`, from the JAXLIN_* variables launch_local.sh
sets), builds the mesh over all global devices, shards the model and its LoRA factors by the rules
(`jaxlin.sharding.shard_adapted`), and computes per-module kernels with rows over ``data``; process 0 alone
writes them, with the logits, to ``--out``. Without ``--mesh`` it is the single-device reference.
tests/test_multiprocess.py compares the two; docs/scaling.md shows the command.
"""
from __future__ import annotations

import argparse
import dataclasses

TARGETS = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value"), "gpt2": ("c_attn",)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=None, help="data=D,model=M over every global device (default: no mesh)")
    ap.add_argument("--out", required=True, help="where process 0 writes the .npz of kernels and logits")
    ap.add_argument("--family", default="llama", choices=sorted(TARGETS))
    ap.add_argument("--examples", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=4)
    args = ap.parse_args(argv)

    from jaxlin import distributed

    distributed.initialize()  # before any computation; a no-op without the JAXLIN_* variables

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxlin import adapters, module_ntk, sharding, testing

    model = testing.tiny_model(args.family, task="classification", num_labels=3, seed=0)
    adapted = adapters.adapt(model, lora=adapters.LoRA(TARGETS[args.family], rank=2, seed=1), head=True)
    keys = iter(jax.random.split(jax.random.key(2), 64))  # b ≠ 0, so ∂f/∂A is not zero either
    lora = {n: {"a": ab["a"], "b": 0.3 * jax.random.normal(next(keys), ab["b"].shape, ab["b"].dtype)}
            for n, ab in adapted.trainable["lora"].items()}
    adapted = dataclasses.replace(adapted, trainable={**adapted.trainable, "lora": lora})
    batch = testing.random_batch(model, batch=args.examples, length=9, seed=3)
    mesh = None if args.mesh is None else distributed.parse_mesh(args.mesh)
    params = adapted.params()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if mesh is not None:
        adapted = sharding.shard_adapted(adapted, mesh)
        params = adapted.params()
        rep = NamedSharding(mesh, P())
        ids, mask = sharding.place((ids, mask), (rep, rep))
    logits = jax.jit(adapted.run)(params, ids, mask)
    if not logits.is_fully_addressable:
        logits = multihost_utils.process_allgather(logits, tiled=True)
    kernels = module_ntk.module_ntks(adapted, batch, block_size=args.block_size, mesh=mesh)
    if distributed.is_main_process():
        np.savez(args.out, logits=np.asarray(logits), **kernels)
        print(f"wrote {len(kernels)} kernels and logits {np.shape(logits)} to {args.out} from "
              f"{jax.process_count()} process(es), {len(jax.devices())} device(s)", flush=True)


if __name__ == "__main__":
    main()
