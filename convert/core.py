"""Strict, planned conversion of a flat PyTorch state dict into a nested JAX parameter tree.

A model family supplies *rules*: for every parameter of our tree (every layer slot of a stacked
parameter), which source tensor fills it and how it is reshaped. Conversion is then two steps:

1. `check` — from source key names and shapes alone (works on torch's meta device, costs no memory):
   every rule's source key exists, every source key is consumed, every target slot is filled exactly
   once, every shape agrees. Any violation is one `ConversionError` line naming the keys.
2. `assemble` — reads tensors one at a time and writes them into the target arrays; a stacked
   parameter is built slot by slot and handed to `put` (e.g. `jax.device_put` onto a sharding) as
   soon as it is complete, so peak host memory is one parameter, not the checkpoint.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from convert.errors import ConversionError, short_list
from vapjax.tree import Path
from vapjax.tree import unflatten as unflatten_tree


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform("identity", lambda a: a, lambda s: tuple(s))
# torch Linear stores [out, in]; flax Dense kernels are [in, out].
LINEAR = Transform("linear", lambda a: a.T, lambda s: tuple(s[::-1]))


def flatten_leading(n: int) -> Transform:
    """Merge the first `n` axes into one, e.g. a [1, S, D] buffer into [S, D] (n=2)."""
    def shape(s):
        return (int(np.prod(s[:n])),) + tuple(s[n:])
    return Transform(f"flatten{n}", lambda a: a.reshape(shape(a.shape)), shape)


def conv_as_linear(spatial_dims: int) -> Transform:
    """A torch Conv{N}d weight [out, in, *k] whose kernel equals its stride, as a Dense kernel
    [in*prod(k), out] over patches flattened in (in, *k) order."""
    def shape(s):
        return (int(np.prod(s[1:])), s[0])
    return Transform(f"conv{spatial_dims}d_patch", lambda a: a.reshape(a.shape[0], -1).T, shape)


def conv_kernel(spatial_dims: int) -> Transform:
    """A torch Conv{N}d weight [out, in, *k] as a flax Conv kernel [*k, in, out]."""
    perm = tuple(range(2, 2 + spatial_dims)) + (1, 0)
    return Transform(f"conv{spatial_dims}d", lambda a: a.transpose(perm),
                     lambda s: tuple(s[p] for p in perm))


@dataclasses.dataclass(frozen=True)
class Rule:
    src: str                      # source (PyTorch state-dict) key
    dst: Path                     # parameter path in our tree
    index: int | None = None      # slot along the leading (layer) axis of a stacked parameter
    transform: Transform = IDENTITY


def storage_dtype(source_dtypes, requested: Any = None) -> np.dtype:
    """The dtype converted arrays are stored in, for every converter: `requested` if given; else a
    checkpoint that is all bf16 stays bf16 and anything else (fp32, fp64 buffers, fp16) becomes fp32."""
    if requested is not None:
        return np.dtype(requested)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    return bf16 if set(map(np.dtype, source_dtypes)) == {bf16} else np.dtype(np.float32)


def path_str(path: Path, index: int | None = None) -> str:
    return "/".join(path) + (f"[{index}]" if index is not None else "")


def check(src_shapes: Mapping[str, Sequence[int]], rules: Sequence[Rule],
          target_shapes: Mapping[Path, Sequence[int]], what: str = "checkpoint") -> None:
    """Raise one ConversionError line if the source, the rules and the target tree disagree."""
    missing = sorted({r.src for r in rules if r.src not in src_shapes})
    if missing:
        raise ConversionError(f"{what}: missing keys: {short_list(missing)}")
    used = {r.src for r in rules}
    unexpected = sorted(k for k in src_shapes if k not in used)
    if unexpected:
        raise ConversionError(f"{what}: unexpected keys: {short_list(unexpected)}")

    slots: dict[Path, set] = defaultdict(set)
    bad_shape = []
    for r in rules:
        if r.dst not in target_shapes:  # a bug in the rules, not in the user's file
            raise ConversionError(f"{what}: rule for {r.src} targets unknown parameter {path_str(r.dst)}")
        want = tuple(target_shapes[r.dst])
        if r.index is not None:
            if not 0 <= r.index < want[0]:
                raise ConversionError(f"{what}: {r.src} targets slot {r.index} of {path_str(r.dst)} {want}")
            want = want[1:]
        got = r.transform.shape(tuple(src_shapes[r.src]))
        if got != want:
            bad_shape.append(f"{r.src} {tuple(src_shapes[r.src])} ({r.transform.name}: {got}) "
                             f"but {path_str(r.dst, r.index)} needs {want}")
        if r.index in slots[r.dst]:
            raise ConversionError(f"{what}: {path_str(r.dst, r.index)} is filled twice")
        slots[r.dst].add(r.index)
    if bad_shape:
        raise ConversionError(f"{what}: wrong shape: {short_list(bad_shape, 4)}")

    unfilled = []
    for path, shape in target_shapes.items():
        got = slots.get(path, set())
        if got == {None}:
            continue
        need = set(range(shape[0])) if None not in got and got else {None}
        if got != need:
            unfilled.append(path_str(path))
    if unfilled:
        raise ConversionError(f"{what}: parameters not filled by any key: {short_list(unfilled)}")


def assemble(load: Callable[[str], np.ndarray], rules: Sequence[Rule],
             target_shapes: Mapping[Path, Sequence[int]], dtype: Any = np.float32,
             put: Callable[[Path, np.ndarray], Any] | None = None) -> dict[str, Any]:
    """Build the nested tree; call `check` first. `put(path, array)` places each finished array."""
    by_dst: dict[Path, list[Rule]] = defaultdict(list)
    for r in rules:
        by_dst[r.dst].append(r)
    flat = {}
    for path, shape in target_shapes.items():
        rs = by_dst[path]
        if rs[0].index is None:
            arr = np.asarray(rs[0].transform.apply(load(rs[0].src)), dtype=dtype)
        else:
            arr = np.empty(tuple(shape), dtype=dtype)
            for r in rs:
                arr[r.index] = r.transform.apply(load(r.src))
        flat[path] = put(path, arr) if put is not None else arr
    return unflatten_tree(flat)
