"""Encode a prepared `vap_data` dataset once with a pipeline's frozen encoders: the `vap_latents` dataset.

    python -m vapjax.data.precompute --data_dir DATA/vap_data/49x480x720/1.0.0 --pipeline ckpt/vap-cog5b --out LATENTS
    python -m vapjax.data.precompute --data_dir DATA/vap_data/49x480x832_score10/1.0.0 --pipeline ckpt/vap-wan14b \
        --out LATENTS

writes LATENTS/vap_latents/<config>/1.0.0 (array_record), in the source's example order, with the fields
of the pipeline's family (`vapjax.data.features`, chosen by the pipeline's VAE):
  CogVideoX
    latent_dist  [f, h, w, 2C]  the VAE posterior of the clip: mean ‖ logvar (logvar clipped as diffusers)
    image_dist   [1, h, w, 2C]  the same for the clip's first frame encoded alone (the image condition)
    text         [L, D]         T5 of the caption: L = 226 tokens, no attention mask, pads kept
  Wan
    latent_dist  [f, h, w, 2C]  the clip's VAE moments, mean and log-variance normalised per channel
    condition    [f, h, w, C]   normalised mode of [first frame, zeros…] (the I2V condition)
    image_embeds [257, 1280]    CLIP of the first frame
    text         [512, D]       UMT5 of the caption, no attention mask, pads kept
  both
    ref_index, path, kind, split  copied from the source (split "train" from a source without it)
and `empty_text.npy` (float32 [L, D], the caption "") beside it, for caption dropout. The dataset's metadata
also holds `index`, the path, kind and split of every example in order, so that a sampler which picks
examples by name (DPO) need not read the records (`vapjax.data.loader.example_index`).

Storage is bfloat16 by default (`--dtype`): it halves the size, and the trainer's transformer takes
bfloat16 anyway. The trainer draws x0 = mean + exp(logvar / 2)·ε (× CogVideoX's scaling factor) itself,
so every epoch sees fresh posterior samples as in the official training. Encoders run jitted, a batch
split over the local devices.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from vapjax.data.features import load_features
from vapjax.data.loader import EMPTY_TEXT, open_builder


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class VapLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`vap_data` encoded by a family's features (`vapjax.data.features`); built by `precompute`, read with
    `tfds.builder_from_directory`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, source: tfds.core.DatasetBuilder, features, batch_size: int, dtype: str, **kwargs):
        self._source, self._features, self._batch_size = source, features, batch_size
        self._dtype = jnp.dtype(dtype)
        name = source.info.config_name or "default"
        super().__init__(config=tfds.core.BuilderConfig(name=name, description=f"{source.data_dir} encoded"),
                         **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        frames, height, width, _ = self._source.info.features["video"].shape
        shapes = self._features.output_shapes(frames, height, width)
        tensor = lambda shape: tfds.features.Tensor(shape=shape, dtype=self._dtype, encoding="bytes")
        source = self._source.info.metadata or {}
        metadata = tfds.core.MetadataDict(
            source=os.fspath(self._source.data_dir), storage_dtype=self._dtype.name,
            min_refs=source.get("min_refs"), all_splits=source.get("all_splits", False),
            **self._features.metadata())
        return tfds.core.DatasetInfo(
            builder=self,
            description="vap_data clips encoded for training: VAE posteriors, conditions, caption embeddings.",
            features=tfds.features.FeaturesDict({
                **{k: tensor(s) for k, s in shapes.items()},
                "ref_index": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "path": tfds.features.Text(),
                "kind": tfds.features.Text(),
                "split": tfds.features.Text(),
            }),
            disable_shuffling=True,  # the source's order: `ref_index` addresses positions
            metadata=metadata,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _encode(self, records: list[dict]) -> dict[str, jax.Array]:
        """Dispatch one batch (asynchronously); a short last batch is padded with copies of its last clip."""
        pad = self._batch_size - len(records)
        clips = np.stack([r["video"] for r in records] + [records[-1]["video"]] * pad)
        captions = [r["caption"].decode("utf-8") for r in records] + [""] * pad
        return {k: v.astype(self._dtype) for k, v in self._features.encode(clips, captions).items()}

    def _examples(self, start: int, records: list[dict], encoded: dict[str, jax.Array]) -> Iterator:
        host = {k: np.asarray(v) for k, v in encoded.items()}
        for j, r in enumerate(records):
            names = {k: r.get(k, d) for k, d in (("path", ""), ("kind", ""), ("split", b"train"))}
            for k, v in names.items():
                self._index[k].append(_text(v))
            yield start + j, {**{k: v[j] for k, v in host.items()}, "ref_index": r["ref_index"], **names}

    def _generate_examples(self):
        source = self._source.as_data_source(split="train")
        self._index = {"path": [], "kind": [], "split": []}
        previous = None
        for start in tqdm(range(0, len(source), self._batch_size), desc="vap_latents: encoding", unit="batch"):
            records = [source[i] for i in range(start, min(start + self._batch_size, len(source)))]
            current = (start, records, self._encode(records))
            if previous:  # hand over the previous batch while the device encodes this one
                yield from self._examples(*previous)
            previous = current
        if previous:
            yield from self._examples(*previous)
        self.info.metadata["index"] = self._index   # written with the dataset info after the last example


def precompute(source, out: str, features, *, batch_size: int | None = None,
               dtype: str = "bfloat16") -> VapLatents:
    """Encode the prepared `vap_data` dataset `source` (folder or builder) with `features`
    (`vapjax.data.features`) into out/vap_latents/…; returns the prepared builder (its `data_dir` holds
    the dataset and empty_text.npy)."""
    batch_size = batch_size or jax.local_device_count()
    builder = VapLatents(source=open_builder(source), features=features, batch_size=batch_size, dtype=dtype,
                         data_dir=out, file_format="array_record")
    builder.download_and_prepare()
    np.save(os.path.join(builder.data_dir, EMPTY_TEXT), features.empty_text())
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Precompute the training features (VAE latents, caption embeddings, "
                                            "conditions) of a vap_data dataset.")
    p.add_argument("--data_dir", required=True,
                   help="the prepared vap_data dataset folder (…/vap_data/<config>/1.0.0)")
    p.add_argument("--pipeline", required=True, help="a converted CogVideoX(-VAP) or Wan(-VAP) pipeline folder")
    p.add_argument("--out", required=True, help="TFDS data_dir to write vap_latents to")
    p.add_argument("--batch_size", type=int, help="clips per encoder call (default: the local device count)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="storage dtype")
    p.add_argument("--compute_dtype", choices=("bfloat16", "float32"),
                   help="encoder weights and compute (default: as stored)")
    p.add_argument("--tiling", action="store_true", help="encode in spatial tiles (less memory)")
    p.add_argument("--max_length", type=int, help="caption tokens (default: the family's, 226 or 512)")
    args = p.parse_args(argv)
    features = load_features(args.pipeline, dtype=args.compute_dtype, tiling=args.tiling, text_length=args.max_length)
    builder = precompute(args.data_dir, args.out, features, batch_size=args.batch_size, dtype=args.dtype)
    print(f"dataset: {builder.data_dir}")


if __name__ == "__main__":
    main()

