"""Runs the tiny training config in a fresh process (own XLA flags / jax.distributed) and dumps the
losses and final trainable parameters: python tests/train_worker.py WORKDIR OUT.npz '{"steps": 3}'."""
import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import train
from test_training import tiny_config
from vapjax import tree as vtree


def main(workdir, out, overrides):
    train.maybe_initialize_distributed()
    history, state, _ = train.train(tiny_config(workdir, **json.loads(overrides)))
    flat = {"/".join(p): np.asarray(multihost_utils.process_allgather(a, tiled=True))
            for p, a in vtree.flatten(state.params).items()}
    if jax.process_index() == 0:
        np.savez(out, losses=[m["loss"] for m in history], **flat)
        with open(out + ".specs.json", "w") as f:
            # PartitionSpec entries as lists, trailing replicated dims dropped (repr differs across JAX versions).
            specs = {"/".join(p): list(a.sharding.spec) for p, a in vtree.flatten(state.params).items()}
            json.dump({k: v[:max([i + 1 for i, x in enumerate(v) if x is not None] or [0])] for k, v in specs.items()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
