"""Lazy, tensor-by-tensor reading of PyTorch safetensors checkpoints, without PyTorch.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes. We memory-map the file and materialise one tensor
at a time, so a 20 GB checkpoint never sits in memory whole. bf16 comes through ml_dtypes (a JAX
dependency), which numpy's safetensors backend cannot do.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors format's own limit; a larger length is a corrupt file


def read_json(path: str) -> dict:
    """A JSON object from a file, or a one-line ConversionError."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def read_config(folder: str) -> dict:
    """A model folder's config.json, or a one-line ConversionError."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    return read_json(path)


def shard_path(index_path: str, name: object) -> str:
    """The file a `*.index.json` names, which must be a relative path inside the index's folder."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or os.path.isabs(name):
        raise ConversionError(f"{index_path}: shard {name!r} is not a relative file name")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ConversionError(f"{index_path}: shard {name!r} points outside the checkpoint folder")
    return os.path.join(os.path.dirname(index_path), *parts)


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                # Bounded before reading: a corrupt length must not become a huge allocation.
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise OverflowError(f"header length {n} exceeds "
                                        f"{'the file' if n > size - 8 else 'the 100 MB limit'}")
                header = json.loads(f.read(n))
        except (OSError, OverflowError, struct.error, ValueError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._offset = 8 + n
        self._entries = header
        self._mmap = None
        for key, e in header.items():  # every byte range inside the file and of the right length
            try:
                begin, end = e["data_offsets"]
                ok = 0 <= begin <= end <= size - self._offset
                if ok and e["dtype"] in _DTYPES:
                    ok = end - begin == int(np.prod(e["shape"])) * np.dtype(_DTYPES[e["dtype"]]).itemsize
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise ConversionError(f"{path}: tensor {key!r} has a bad byte range {e.get('data_offsets')!r}"
                                      if isinstance(e, dict) else f"{path}: tensor {key!r} has no byte range")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        code = self._entries[key]["dtype"]
        if code not in _DTYPES:
            raise ConversionError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")
        return np.dtype(_DTYPES[code])

    def load(self, key: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._entries[key]["data_offsets"]
        raw = self._mmap[self._offset + begin:self._offset + end]
        return np.frombuffer(raw, dtype=self.dtype(key)).reshape(self.shape(key))


class TensorSource:
    """All tensors of a model folder: a single safetensors file or a sharded `*.index.json`."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    raise ConversionError(f"tensor {k!r} appears in both {self._where[k].path} and {f.path}")
                self._where[k] = f

    @classmethod
    def open(cls, path: str, stem: str = "diffusion_pytorch_model") -> "TensorSource":
        """`path` is a .safetensors file, an .index.json, or a folder holding `{stem}.safetensors[.index.json]`."""
        if os.path.isdir(path):
            candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json",
                          "model.safetensors", "model.safetensors.index.json"]
            found = [c for c in candidates if os.path.exists(os.path.join(path, c))]
            if not found:
                raise ConversionError(f"{path}: no {stem}.safetensors or {stem}.safetensors.index.json "
                                      f"(only safetensors checkpoints are supported)")
            path = os.path.join(path, found[0])
        if not os.path.exists(path):
            raise ConversionError(f"{path}: no such file")
        if path.endswith(".index.json"):
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{path}: no weight_map")
            shards = sorted({shard_path(path, s) for s in weight_map.values()})
            return cls([SafetensorsFile(s) for s in shards])
        return cls([SafetensorsFile(path)])

    def keys(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self._where.items()}

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def load(self, key: str) -> np.ndarray:
        return self._where[key].load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
