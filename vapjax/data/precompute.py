"""Encode a prepared `vap_data` dataset once with the frozen VAE and T5: the `vap_latents` dataset.

    python -m vapjax.data.precompute --data_dir DATA/vap_data/49x480x720/1.0.0 --pipeline ckpt/vap-cog5b --out LATENTS

writes LATENTS/vap_latents/<config>/1.0.0 (array_record), in the source's example order, with:
    latent_dist  [f, h, w, 2C]  the VAE posterior of the clip: mean ‖ logvar (logvar clipped as diffusers)
    image_dist   [1, h, w, 2C]  the same for the clip's first frame encoded alone (the image condition)
    text         [L, D]         T5 of the caption: L = 226 tokens, no attention mask, pads kept (CogVideoX)
    ref_index, path             copied from the source
and `empty_text.npy` (float32 [L, D], T5 of "") beside it, for caption dropout.

Storage is bfloat16 by default (`--dtype`): it halves the size, and the trainer's transformer takes
bfloat16 anyway. The trainer samples x0 = (mean + exp(logvar / 2)·ε)·scaling_factor itself, so every
epoch sees fresh posterior samples as in the official training. Encoders run jitted, a batch split over
the local devices.
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

from vapjax.data.loader import EMPTY_TEXT, open_builder
from vapjax.encoders import MAX_LENGTH, Encoders  # Encoders: also imported from here by train.py


class VapLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`vap_data` encoded by `Encoders`; built by `precompute`, read with `tfds.builder_from_directory`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, source: tfds.core.DatasetBuilder, encoders: Encoders, batch_size: int, dtype: str,
                 **kwargs):
        self._source, self._encoders, self._batch_size = source, encoders, batch_size
        self._dtype = jnp.dtype(dtype)
        name = source.info.config_name or "default"
        super().__init__(config=tfds.core.BuilderConfig(name=name, description=f"{source.data_dir} encoded"),
                         **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        frames, height, width, _ = self._source.info.features["video"].shape
        shapes = self._encoders.output_shapes(frames, height, width)
        tensor = lambda shape: tfds.features.Tensor(shape=shape, dtype=self._dtype, encoding="bytes")
        metadata = tfds.core.MetadataDict(
            source=os.fspath(self._source.data_dir), storage_dtype=self._dtype.name,
            scaling_factor=self._encoders.vae_config.scaling_factor, max_length=self._encoders.max_length,
            min_refs=(self._source.info.metadata or {}).get("min_refs"))
        return tfds.core.DatasetInfo(
            builder=self,
            description="VAE posteriors (mean ‖ logvar) of vap_data clips and their first frames, T5 captions.",
            features=tfds.features.FeaturesDict({
                **{k: tensor(s) for k, s in shapes.items()},
                "ref_index": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "path": tfds.features.Text(),
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
        out = {"latent_dist": self._encoders.encode_video(clips),
               "image_dist": self._encoders.encode_video(clips[:, :1]),
               "text": self._encoders.encode_text(captions)}
        return {k: v.astype(self._dtype) for k, v in out.items()}

    def _examples(self, start: int, records: list[dict], encoded: dict[str, jax.Array]) -> Iterator:
        host = {k: np.asarray(v) for k, v in encoded.items()}
        for j, r in enumerate(records):
            yield start + j, {**{k: v[j] for k, v in host.items()}, "ref_index": r["ref_index"], "path": r["path"]}

    def _generate_examples(self):
        source = self._source.as_data_source(split="train")
        previous = None
        for start in tqdm(range(0, len(source), self._batch_size), desc="vap_latents: encoding", unit="batch"):
            records = [source[i] for i in range(start, min(start + self._batch_size, len(source)))]
            current = (start, records, self._encode(records))
            if previous:  # hand over the previous batch while the device encodes this one
                yield from self._examples(*previous)
            previous = current
        if previous:
            yield from self._examples(*previous)


def precompute(source, out: str, encoders: Encoders, *, batch_size: int | None = None,
               dtype: str = "bfloat16") -> VapLatents:
    """Encode the prepared `vap_data` dataset `source` (folder or builder) into out/vap_latents/…;
    returns the prepared builder (its `data_dir` holds the dataset and empty_text.npy)."""
    batch_size = batch_size or jax.local_device_count()
    builder = VapLatents(source=open_builder(source), encoders=encoders, batch_size=batch_size, dtype=dtype,
                         data_dir=out, file_format="array_record")
    builder.download_and_prepare()
    empty = np.asarray(encoders.encode_text([""]), np.float32)[0]
    np.save(os.path.join(builder.data_dir, EMPTY_TEXT), empty)
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Precompute VAE latents and T5 embeddings of a vap_data dataset.")
    p.add_argument("--data_dir", required=True,
                   help="the prepared vap_data dataset folder (…/vap_data/<config>/1.0.0)")
    p.add_argument("--pipeline", required=True, help="a converted CogVideoX(-VAP) pipeline folder")
    p.add_argument("--out", required=True, help="TFDS data_dir to write vap_latents to")
    p.add_argument("--batch_size", type=int, help="clips per encoder call (default: the local device count)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="storage dtype")
    p.add_argument("--compute_dtype", choices=("bfloat16", "float32"),
                   help="encoder weights and compute (default: as stored)")
    p.add_argument("--tiling", action="store_true", help="encode in spatial tiles (less memory)")
    p.add_argument("--max_length", type=int, default=MAX_LENGTH)
    args = p.parse_args(argv)
    encoders = Encoders.load(args.pipeline, dtype=args.compute_dtype, tiling=args.tiling, max_length=args.max_length)
    builder = precompute(args.data_dir, args.out, encoders, batch_size=args.batch_size, dtype=args.dtype)
    print(f"dataset: {builder.data_dir}")


if __name__ == "__main__":
    main()


class EncodedBatches:
    """Raw `vap_data` batches (make_loader(kind="raw")) encoded on the fly into the latents format,
    for training without a precompute pass. Checkpointable like the iterator it wraps."""

    def __init__(self, raw: Iterator[dict], encoders: Encoders):
        self.raw, self.encoders = raw, encoders

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self.raw)
        n = b["ref_video"].shape[1]
        refs = b["ref_video"].reshape((-1,) + b["ref_video"].shape[2:])
        enc = self.encoders
        out = {"latent_dist": enc.encode_video(b["video"]), "image_dist": enc.encode_video(b["video"][:, :1]),
               "text": enc.encode_text([str(c) for c in b["caption"]]),
               "ref_latent_dist": enc.encode_video(refs), "ref_image_dist": enc.encode_video(refs[:, :1]),
               "ref_text": enc.encode_text([str(c) for c in np.ravel(b["ref_caption"])])}
        out = {k: np.asarray(v, np.float32) for k, v in out.items()}
        for k in ("ref_latent_dist", "ref_image_dist", "ref_text"):
            out[k] = out[k].reshape((-1, n) + out[k].shape[1:])
        return out

    def get_state(self):
        return self.raw.get_state()

    def set_state(self, state) -> None:
        self.raw.set_state(state)
