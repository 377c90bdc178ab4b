"""Converted-model folders: one layout for every component (transformer, VAE, text encoder).

    <dir>/config.json   {"vapjax_component": <kind>, "format": 1, "config": {...model config...}}
    <dir>/params/       the parameter tree, an orbax (tensorstore) checkpoint

`python -m convert` writes these; everything else in vapjax reads them through `load`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

FORMAT = 1


class CheckpointError(ValueError):
    """A folder that is not (or not the right kind of) converted vapjax checkpoint."""


def save(path: str, params: Any, kind: str, config: dict) -> None:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), params, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vapjax_component": kind, "format": FORMAT, "config": config}, f, indent=1)


def _not_converted(path: str) -> CheckpointError:
    torch_like = any(os.path.exists(os.path.join(path, n)) for n in
                     ("model_index.json", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json", "model.safetensors"))
    hint = (f"this looks like a PyTorch/diffusers folder; convert it first: python -m convert {path} OUT_DIR"
            if torch_like else "convert a diffusers folder with: python -m convert SRC OUT_DIR")
    return CheckpointError(f"{path}: not a converted vapjax checkpoint ({hint})")


def read_config(path: str, kind: str | None = None) -> dict:
    meta_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise _not_converted(path) from None
    if "vapjax_component" not in meta:
        raise _not_converted(path)
    if kind is not None and meta["vapjax_component"] != kind:
        raise CheckpointError(f"{path}: holds a {meta['vapjax_component']!r}, expected a {kind!r}")
    return meta["config"]


def load(path: str, kind: str | None = None, *, dtype: Any = None,
         sharding: Callable[[tuple[str, ...], tuple[int, ...]], Any] | None = None) -> tuple[Any, dict]:
    """Read (params, config). `sharding(path, shape)` places each array straight onto its sharding;
    `dtype` casts floating arrays (e.g. a float32 checkpoint loaded as bfloat16)."""
    config = read_config(path, kind)
    params_dir = os.path.join(os.path.abspath(path), "params")
    ckpt = ocp.StandardCheckpointer()
    try:
        tree = ckpt.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises a zoo of types for a missing/corrupt folder
        raise CheckpointError(f"{path}: unreadable parameters ({type(e).__name__})") from None

    def abstract(keypath, m):
        names = tuple(getattr(k, "key", str(k)) for k in keypath)
        s = sharding(names, tuple(m.shape)) if sharding else None
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)

    target = jax.tree_util.tree_map_with_path(abstract, tree)
    if sharding is None:  # everything on the default device
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), target)
    params = ckpt.restore(params_dir, target)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return params, config
