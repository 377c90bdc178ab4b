"""Multi-reference SFT (spec §7.7): how many references a step trains with.

The official loader samples `sample_ref_videos_num` = 3 references per target and skips each one after
the first with probability `mask_ref_ratio` (0.3), so a sample has N = 1 + Binomial(2, 0.7) references
(P = 0.09, 0.42, 0.49 for N = 1, 2, 3), concatenated on frames and text; the model's RoPE depends on N.

Mixed N inside one batch would need padding, and padded references cannot be masked out: the reference
RoPE positions depend on N (spec §3.1), so a padded sample is a different computation. We bucket
instead, with the whole global batch as the bucket: each step draws one N from the official distribution
(seeded by (seed, step), so every host agrees — a global batch has one shape — and a resumed run draws
the same N) and keeps the first N of the loader's `num_refs` randomly sampled references. The first N
of a uniform random ordering is a uniform random ordered N-subset, as the official skip rule gives, so
each sample sees the official distribution of references; only the within-step correlation of N
differs (the official trainer, one sample per GPU, draws per GPU). Each sample's loss is the one a
per-sample run with its N computes (tests/test_recipes.py).

A clip with fewer references than `num_refs` (the loader's `allow_fewer_refs`, which repeats them to
fill the slots and reports `ref_count`): the official loader draws random.sample(refs, 3) (DS:797),
which raises for such a clip, so it has no rule for it. Ours keeps "N ≤ the references a sample has":
the step's N is capped by the fewest distinct references in the global batch (agreed over hosts), so
no sample ever trains on a repeated reference.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def _global_min(value: int) -> int:
    """The smallest `value` over the JAX processes (every host must cut its batch alike)."""
    import jax  # noqa: PLC0415  (only multi-host runs need it)
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return int(np.min(multihost_utils.process_allgather(np.int32(value))))


class RefDropout:
    """Wraps a batch iterator whose `ref_*` fields carry `num_refs` references on axis 1."""

    def __init__(self, batches: Iterator[dict], *, num_refs: int, mask_ref_ratio: float, seed: int):
        # ratio 0: every step keeps all num_refs references (less only where a sample has fewer).
        if not 0 <= mask_ref_ratio < 1:
            raise ValueError(f"data.mask_ref_ratio={mask_ref_ratio} must be in [0, 1)")
        self.batches, self.num_refs, self.ratio, self.seed = batches, num_refs, mask_ref_ratio, seed
        self.step = 0

    def draw(self, step: int) -> int:
        """N for `step`: 1 + the number of the other references that survive their skip draw."""
        return 1 + int(np.random.default_rng((self.seed, 3, step)).binomial(self.num_refs - 1, 1 - self.ratio))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        n = self.draw(self.step)
        if "ref_count" in batch:
            n = min(n, _global_min(int(np.min(batch["ref_count"]))))
        self.step += 1
        out = {k: (v[:, :n] if k.startswith("ref_") and k != "ref_count" else v) for k, v in batch.items()}
        if "ref_count" in out:
            out["ref_count"] = np.minimum(out["ref_count"], n)
        return out

    def get_state(self) -> dict:
        return {"batches": self.batches.get_state(), "step": self.step}

    def set_state(self, state: dict) -> None:
        self.batches.set_state(state["batches"])
        self.step = int(state["step"])
