"""Runs the tiny training config in a fresh process (own XLA flags / jax.distributed) and dumps the
losses and final trainable parameters: python tests/train_worker.py WORKDIR OUT.npz '{"steps": 3}'.

Run as one of JAX_NUM_PROCESSES processes, it also checks that it really is part of a joint run:
`jax.process_count()` is that number, and the examples this process loaded are its own shard of
every global batch — across processes disjoint and together exactly the batch a single process
would load. Each process writes what it loaded to OUT.p<process index>.json."""
import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import train
from test_training import tiny_config
from vapjax import tree as vtree
from vapjax.data.random_latents import RandomLatents


class Recording:
    """Wraps the training data iterator and keeps the example indices of every batch it hands out."""

    def __init__(self, data):
        self.data, self.indices = data, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.data)
        self.indices.append(np.asarray(batch["index"]).tolist())
        return batch

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def check_shards(c, loaded: list[list[int]]) -> None:
    """This process's batches are its shard; all processes' shards are disjoint and cover each global batch."""
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(loaded, np.int32)))  # [P, steps, B/P]
    single = RandomLatents(size=c.data.size, batch_size=c.batch_size, frames=1, height=1, width=1, channels=1,
                           text_len=1, text_dim=1, seed=c.data.seed, process_index=0, process_count=1)
    for step in range(gathered.shape[1]):
        shards = [set(gathered[p, step].tolist()) for p in range(gathered.shape[0])]
        assert all(len(s) == c.batch_size // len(shards) for s in shards), (step, shards)
        assert len(set().union(*shards)) == sum(map(len, shards)), f"step {step}: shards overlap {shards}"
        global_batch = set(next(single)["index"].tolist())
        assert set().union(*shards) == global_batch, f"step {step}: shards {shards} != global batch {global_batch}"


def main(workdir, out, overrides):
    train.maybe_initialize_distributed()
    want = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    assert jax.process_count() == want, f"process_count {jax.process_count()}, expected {want}"
    c = tiny_config(workdir, **json.loads(overrides))
    recording = {}

    def make_data(c, model_cfg, _make=train.make_data):
        data, empty = _make(c, model_cfg)
        recording["data"] = Recording(data)
        return recording["data"], empty

    train.make_data = make_data

    class RecordingStep(train.ShardedStep):
        """Keeps the activation-sharding constraints of the step as lowered (its first call's arguments)."""
        def __call__(self, *args):
            if "constraints" not in recording:
                hlo = self.lower(*args).as_text()
                recording["constraints"] = sorted({line.split("<@", 1)[1].split(">", 1)[0] for line in hlo.splitlines()
                                                   if "sdy.sharding_constraint" in line})
            return super().__call__(*args)

    train.ShardedStep = RecordingStep
    history, state, _ = train.train(c)
    loaded = recording["data"].indices
    assert len(loaded) == c.steps and all(len(b) == c.batch_size // jax.process_count() for b in loaded)
    check_shards(c, loaded)
    with open(f"{out}.p{jax.process_index()}.json", "w") as f:
        json.dump({"process_count": jax.process_count(), "process_index": jax.process_index(), "indices": loaded,
                   "constraints": recording["constraints"]}, f)
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
