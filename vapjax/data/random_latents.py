"""A small, fixed, paired dataset of random VAE posteriors and caption embeddings, in memory.

For smoke tests, the tiny training config and benchmarks: batches have exactly the format of the
precomputed VAP-Data loader (`latent_dist`, `image_dist`, `text`, `ref_*`, `index`), the examples are fixed (so a
model can fit them and the loss must fall), and the iterator is deterministic, host-sharded and
checkpointable (`get_state` / `set_state`) like the real one.
"""
from __future__ import annotations

import jax
import numpy as np


class RandomLatents:
    """`size` examples; each epoch is a seeded permutation; each host takes its slice of a global batch."""

    def __init__(self, *, size: int, batch_size: int, frames: int, height: int, width: int, channels: int,
                 text_len: int, text_dim: int, num_refs: int = 1, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"global batch {batch_size} does not split over {self.process_count} hosts")
        self.batch_size, self.num_refs, self.seed, self.size = batch_size, num_refs, seed, size
        rng = np.random.default_rng(seed)
        dist = lambda *s: np.concatenate([rng.standard_normal(s + (channels,), np.float32),
                                          np.full(s + (channels,), -4.0, np.float32)], -1)  # small variance
        self.latent_dist = dist(size, frames, height, width)
        self.image_dist = np.concatenate([self.latent_dist[:, :1, ..., :channels],
                                          self.latent_dist[:, :1, ..., channels:]], -1)
        self.text = rng.standard_normal((size, text_len, text_dim), np.float32)
        self.empty_text = rng.standard_normal((text_len, text_dim), np.float32)
        self.step = 0

    def _indices(self, step: int) -> np.ndarray:
        """Global example indices of batch `step`."""
        per_epoch = self.size // self.batch_size
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def _refs(self, step: int, idx: np.ndarray) -> np.ndarray:
        """Each target's references: other examples (never itself), drawn per step."""
        rng = np.random.default_rng((self.seed, 1, step))
        offs = rng.integers(1, self.size, (len(idx), self.num_refs))
        return (idx[:, None] + offs) % self.size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self._indices(self.step)
        refs = self._refs(self.step, idx)
        local = self.batch_size // self.process_count
        sl = slice(self.process_index * local, (self.process_index + 1) * local)
        idx, refs = idx[sl], refs[sl]
        self.step += 1
        return {"latent_dist": self.latent_dist[idx], "image_dist": self.image_dist[idx], "text": self.text[idx],
                "ref_latent_dist": self.latent_dist[refs], "ref_image_dist": self.image_dist[refs],
                "ref_text": self.text[refs], "index": idx, "ref_index": refs}

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.step = int(state["step"])
