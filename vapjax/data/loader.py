"""Training batches from the prepared datasets, with grain: paired, shuffled, sharded by host, resumable.

Two dataset kinds (both array_record, read through TFDS's data source; TensorFlow is not needed):
- "raw": `vap_data` (see `vap_data.py`); the trainer encodes on the fly.
- "latents": `vap_latents` (see `precompute.py`).

A batch is a dict of numpy arrays, B = batch size, N = num_refs:
    raw:      video uint8 [B,F,H,W,3]   caption str [B]   ref_video [B,N,F,H,W,3]   ref_caption str [B,N]
    latents:  every field the family's precompute stored (`vapjax.data.features`), e.g. CogVideoX's
              latent_dist [B,f,h,w,2C]  image_dist [B,1,h,w,2C]  text [B,L,D]   (mean ‖ logvar on channels)
              and each as ref_<field> [B,N,...]: ref_latent_dist [B,N,f,h,w,2C]  ref_text [B,N,L,D] ...
    both:     index int64 [B] (target example), ref_index int64 [B,N] (reference examples),
              ref_count int64 [B] (distinct references; < N only with allow_fewer_refs)

Pairing follows the official loader: references = random.sample(the example's ref_index, N), each with
its own caption / text. The draw for example i in epoch e uses random.Random seeded by (seed, e, i), so
it does not depend on the shuffle, the sharding or the worker count. `caption_dropout` (spec §7.5) swaps
the target and all reference captions of a sample together for "" (raw) or the stored embedding of ""
(latents); it defaults to 0, i.e. off, so the trainer can do it instead.

Order: the examples are split into per-host shards (strided, equal sizes), each shard is shuffled with
`seed` anew every epoch (grain's index shuffle), batches are consecutive and may straddle epochs. The
iterator is grain's: `get_state()` is a small JSON-serialisable dict and `set_state(state)` on a fresh
loader built with the same arguments resumes exactly; it also works with grain's orbax checkpoint
handler.
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

# Fields a dataset of each kind must have. A latents dataset's other fields (its family's conditions)
# come along: every feature but the BOOKKEEPING ones is paired.
FIELDS = {"raw": ("video", "caption"), "latents": ("latent_dist", "text")}
BOOKKEEPING = ("ref_index", "path", "kind", "split")
EMPTY_TEXT = "empty_text.npy"


def open_builder(source) -> tfds.core.DatasetBuilder:
    """A prepared dataset: its folder (…/<name>/<config>/<version>) or a builder."""
    if isinstance(source, tfds.core.DatasetBuilder):
        return source
    return tfds.builder_from_directory(os.fspath(source))


def example_index(source) -> dict[str, list[str]]:
    """{"path", "kind", "split": one entry per example, in order} of a prepared dataset, from the index
    `precompute` records in its metadata; a dataset without one (an older precompute, or `vap_data`) has
    its records read once. A dataset without splits is all "train"."""
    builder = open_builder(source)
    index = (builder.info.metadata or {}).get("index")
    if index is not None:
        return {k: list(v) for k, v in index.items()}
    records = builder.as_data_source(split="train")
    index = {"path": [], "kind": [], "split": []}
    for i in range(len(records)):
        r = records[i]
        for k, default in (("path", ""), ("kind", ""), ("split", "train")):
            index[k].append(_text(r.get(k, default)))
    return index


def empty_text(dataset_dir) -> np.ndarray:
    """The T5 embedding of "" [L, D] (float32) that `precompute` stores beside a latents dataset."""
    path = os.path.join(os.fspath(dataset_dir), EMPTY_TEXT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no empty-caption embedding (is this a precomputed latents dataset?)")
    return np.load(path)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class PairedSource:
    """Random access to (target, references) pairs over a TFDS data source.

    `fields` are copied from the target and, stacked, from each reference as "ref_<field>". `dropout`
    maps a field to its dropped value. Index i ≥ len(self) means example i mod len in epoch i // len
    (grain's convention), so `self[i]` and `self.get(i % n, i // n)` agree.
    """
    source: Any
    fields: Sequence[str]
    num_refs: int = 1
    seed: int = 0
    allow_fewer_refs: bool = False
    caption_dropout: float = 0.0
    dropout: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        epoch, index = divmod(int(index), len(self))
        return self.get(index, epoch)

    def _read(self, index: int) -> dict:
        record = self.source[index]
        return {k: _text(v) if k in ("caption", "path", "kind") else v for k, v in record.items()}

    def draw(self, rng: random.Random, refs: Sequence[int], index: int) -> tuple[list[int], int]:
        """(N reference indices, how many are distinct): the official random.sample, or with
        allow_fewer_refs all references in random order, repeated to fill N."""
        refs = [int(r) for r in refs]
        if len(refs) >= self.num_refs:
            return rng.sample(refs, self.num_refs), self.num_refs
        if not self.allow_fewer_refs or not refs:
            raise ValueError(f"example {index} has {len(refs)} reference(s), fewer than num_refs={self.num_refs} "
                             "(allow_fewer_refs=True repeats the ones it has)")
        drawn = rng.sample(refs, len(refs))
        return [drawn[k % len(drawn)] for k in range(self.num_refs)], len(drawn)

    def get(self, index: int, epoch: int = 0) -> dict:
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        target = self._read(index)
        chosen, count = self.draw(rng, target["ref_index"], index)
        refs = [self._read(r) for r in chosen]
        drop = rng.random() < self.caption_dropout
        out = {"index": np.int64(index), "ref_index": np.array(chosen, np.int64), "ref_count": np.int64(count)}
        for name in self.fields:
            if drop and name in self.dropout:
                out[name], values = self.dropout[name], [self.dropout[name]] * self.num_refs
            else:
                out[name], values = target[name], [r[name] for r in refs]
            out["ref_" + name] = np.stack([np.asarray(v) for v in values])
        return out


@dataclasses.dataclass(frozen=True)
class _Pair:
    """map_with_index body: position k of the shard stream, example i -> the pair (picklable for workers)."""
    paired: PairedSource
    epoch_length: int

    def __call__(self, k: int, i: int) -> dict:
        return self.paired.get(int(i), k // self.epoch_length)


def _shard(ds: grain.MapDataset, options: grain.sharding.ShardOptions) -> grain.MapDataset:
    if options.drop_remainder:
        ds = ds[: len(ds) - len(ds) % options.shard_count]
    return ds[options.shard_index::options.shard_count]


def _dropout_values(builder, kind: str) -> dict:
    if kind == "raw":
        return {"caption": ""}
    dtype = builder.info.features["text"].np_dtype
    return {"text": empty_text(builder.data_dir).astype(dtype)}


def _require_multiprocessing_flags() -> None:
    """grain's worker processes read absl flags; outside absl.app nothing has parsed them (defaults are fine)."""
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(source, *, kind: str = "latents", batch_size: int, num_refs: int = 1, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, worker_count: int = 0,
                shard_by_host: bool = True, shard_options: grain.sharding.ShardOptions | None = None,
                allow_fewer_refs: bool = False, caption_dropout: float = 0.0, prefetch: int = 2,
                split: str = "train"):
    """A checkpointable iterator of batches (see the module docstring).

    `source`: a prepared dataset folder or builder. Sharding: `shard_options` if given, else one shard
    per JAX process (`shard_by_host`, equal sizes) or none. `num_epochs=None` repeats forever; the last
    incomplete batch is dropped. `worker_count` > 0 reads in that many processes; `prefetch` batches are
    read ahead (per worker).
    """
    if kind not in FIELDS:
        raise ValueError(f"kind={kind!r}: one of {sorted(FIELDS)}")
    builder = open_builder(source)
    missing = [f for f in (*FIELDS[kind], "ref_index") if f not in builder.info.features]
    if missing:
        raise ValueError(f"{builder.data_dir}: no field(s) {', '.join(missing)}: not a {kind!r} dataset")
    metadata = builder.info.metadata or {}
    if metadata.get("all_splits"):
        raise ValueError(f"{builder.data_dir}: built with every split (the DPO candidate pools); training on pairs "
                         "needs a dataset of the train split (vap_data without --all_splits)")
    min_refs = metadata.get("min_refs")
    if min_refs is not None and min_refs < num_refs and not allow_fewer_refs:
        raise ValueError(f"{builder.data_dir}: some examples have only {min_refs} reference(s); num_refs={num_refs} "
                         "needs allow_fewer_refs=True")
    fields = FIELDS[kind] if kind == "raw" else tuple(f for f in builder.info.features if f not in BOOKKEEPING)
    paired = PairedSource(builder.as_data_source(split=split), fields, num_refs=num_refs, seed=seed,
                          allow_fewer_refs=allow_fewer_refs, caption_dropout=caption_dropout,
                          dropout=_dropout_values(builder, kind) if caption_dropout > 0 else {})
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard_by_host \
            else grain.sharding.NoSharding()
    ds = _shard(grain.MapDataset.range(len(paired)), shard_options)
    if len(ds) < batch_size:
        raise ValueError(f"{builder.data_dir}: {len(ds)} example(s) in this shard, fewer than batch_size={batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.map_with_index(_Pair(paired, len(ds))).repeat(num_epochs).batch(batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _require_multiprocessing_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch))
    return iter(it)
