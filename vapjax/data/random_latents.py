"""Small, fixed, paired datasets of random VAE posteriors and encoder outputs, in memory.

For smoke tests, the tiny training configs and benchmarks: batches have exactly the format of the
precomputed VAP-Data loader of their family (`RandomLatents`: CogVideoX's `latent_dist`, `image_dist`,
`text`; `RandomWanLatents`: Wan's `latent_dist`, `condition`, `image_embeds`, `text`; each also as
`ref_*` with a reference axis, plus `index` and `ref_index`), the examples are fixed (so a model can fit
them and the loss must fall), and the iterator is deterministic, host-sharded and checkpointable
(`get_state` / `set_state`) like the real one.
"""
from __future__ import annotations

import jax
import numpy as np


def _posteriors(rng: np.random.Generator, shape: tuple[int, ...], channels: int) -> np.ndarray:
    """mean ‖ logvar on channels: standard normal means, small variance (logvar −4)."""
    return np.concatenate([rng.standard_normal(shape + (channels,), np.float32),
                           np.full(shape + (channels,), -4.0, np.float32)], -1)


class _PairedExamples:
    """`size` examples of `self.fields` (arrays with a leading example axis); each epoch is a seeded
    permutation; each host takes its slice of a global batch; every field also comes as `ref_<field>`
    [B, num_refs, ...] for each example's references (other examples, drawn per step)."""

    fields: dict[str, np.ndarray]
    empty_text: np.ndarray

    def __init__(self, *, size: int, batch_size: int, num_refs: int, seed: int,
                 process_index: int | None, process_count: int | None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"global batch {batch_size} does not split over {self.process_count} hosts")
        self.batch_size, self.num_refs, self.seed, self.size = batch_size, num_refs, seed, size
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
        return {**{k: v[idx] for k, v in self.fields.items()}, **{f"ref_{k}": v[refs] for k, v in self.fields.items()},
                "index": idx, "ref_index": refs}

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.step = int(state["step"])


class RandomLatents(_PairedExamples):
    """CogVideoX: each clip's posterior, its first frame's (the clip's first latent frame) and a caption."""

    def __init__(self, *, size: int, batch_size: int, frames: int, height: int, width: int, channels: int,
                 text_len: int, text_dim: int, num_refs: int = 1, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        super().__init__(size=size, batch_size=batch_size, num_refs=num_refs, seed=seed,
                         process_index=process_index, process_count=process_count)
        rng = np.random.default_rng(seed)
        latent_dist = _posteriors(rng, (size, frames, height, width), channels)
        self.fields = {"latent_dist": latent_dist,
                       "image_dist": np.concatenate([latent_dist[:, :1, ..., :channels],
                                                     latent_dist[:, :1, ..., channels:]], -1),
                       "text": rng.standard_normal((size, text_len, text_dim), np.float32)}
        self.empty_text = rng.standard_normal((text_len, text_dim), np.float32)


class RandomWanLatents(_PairedExamples):
    """Wan (spec §4.3): each clip's normalised posterior, its condition (the normalised mode of [first
    frame, black frames…]: here the clip's first latent frame, then one fixed "black frame" latent), the
    CLIP embedding of its first frame and a caption. One reference per example, as Wan-VAP trains."""

    def __init__(self, *, size: int, batch_size: int, frames: int, height: int, width: int, channels: int,
                 text_len: int, text_dim: int, image_len: int, image_dim: int, num_refs: int = 1, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        super().__init__(size=size, batch_size=batch_size, num_refs=num_refs, seed=seed,
                         process_index=process_index, process_count=process_count)
        rng = np.random.default_rng(seed)
        latent_dist = _posteriors(rng, (size, frames, height, width), channels)
        black = np.broadcast_to(rng.standard_normal(channels).astype(np.float32),
                                (size, frames - 1, height, width, channels))
        self.fields = {"latent_dist": latent_dist,
                       "condition": np.concatenate([latent_dist[:, :1, ..., :channels], black], 1),
                       "image_embeds": rng.standard_normal((size, image_len, image_dim), np.float32),
                       "text": rng.standard_normal((size, text_len, text_dim), np.float32)}
        self.empty_text = rng.standard_normal((text_len, text_dim), np.float32)


class RandomDPOPairs(RandomLatents):
    """CogVideoX DPO batches (spec §7.8) over RandomLatents' clips: `size` fixed (win, lose, reference)
    triples of distinct clips with a pair weight; a batch holds `batch_size` pairs. Target fields get a
    pair axis (`latent_dist` [P, 2, …] = (win, lose)), reference fields a reference axis of 1
    (`ref_latent_dist` [P, 1, …]), plus `pair_weight` [P], `index` [P, 2], `ref_index` [P, 1]."""

    def __init__(self, **kwargs):
        super().__init__(num_refs=1, **kwargs)
        rng = np.random.default_rng((self.seed, 2))
        triples = np.stack([rng.permutation(self.size)[:3] for _ in range(self.size)])
        self.win_lose, self.ref = triples[:, :2], triples[:, 2:]
        self.weight = rng.uniform(0.5, 1.5, self.size).astype(np.float32)

    def __next__(self) -> dict[str, np.ndarray]:
        pairs = self._indices(self.step)
        local = self.batch_size // self.process_count
        pairs = pairs[self.process_index * local:(self.process_index + 1) * local]
        self.step += 1
        wl, ref = self.win_lose[pairs], self.ref[pairs]
        return {**{k: v[wl] for k, v in self.fields.items()}, **{f"ref_{k}": v[ref] for k, v in self.fields.items()},
                "pair_weight": self.weight[pairs], "index": wl, "ref_index": ref}
