"""Converted-model folders: one layout and one loader for every component (transformer, VAE, text encoder).

    <dir>/config.json   {"vapjax_component": <kind>, "format": 1, "config": {...model config...}}
    <dir>/params/       the parameter tree, an orbax (tensorstore) checkpoint

`python -m convert` writes these; everything in vapjax reads them through `load(path, kind)`. A kind
names a model config class in `KINDS` (one entry per model; a new family adds its own), and every
config class has `to_dict`/`from_dict` and the two dtype fields `dtype` (compute) and `param_dtype`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vapjax.models import clip, cogvideox, cogvideox_vae, t5, wan, wan_vae

FORMAT = 1

# kind (recorded in config.json) -> model config class.
KINDS: dict[str, type] = {
    "cogvideox_transformer": cogvideox.CogVideoXConfig,
    "wan_transformer": wan.WanConfig,
    "cogvideox_vae": cogvideox_vae.VAEConfig,
    "t5_encoder": t5.T5Config,
    "wan_vae": wan_vae.VAEConfig,
    "clip_vision": clip.CLIPVisionConfig,
    "wan_transformer": wan.WanConfig,
}


class CheckpointError(ValueError):
    """A folder that is not (or not the right kind of) converted vapjax checkpoint."""


def kind_of(config: Any) -> str:
    """The kind a model config is saved as."""
    for kind, cls in KINDS.items():
        if type(config) is cls:
            return kind
    raise CheckpointError(f"no checkpoint kind for a {type(config).__name__} (add it to vapjax.checkpoint.KINDS)")


def save(path: str, params: Any, config: Any) -> None:
    """Write `params` and the model `config` (an instance of a class in KINDS) as a checkpoint folder."""
    kind = kind_of(config)
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), params, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vapjax_component": kind, "format": FORMAT, "config": config.to_dict()}, f, indent=1)


def _not_converted(path: str) -> CheckpointError:
    torch_like = any(os.path.exists(os.path.join(path, n)) for n in
                     ("model_index.json", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json", "model.safetensors"))
    hint = (f"this looks like a PyTorch/diffusers folder; convert it first: python -m convert {path} OUT_DIR"
            if torch_like else "convert a diffusers folder with: python -m convert SRC OUT_DIR")
    return CheckpointError(f"{path}: not a converted vapjax checkpoint ({hint})")


def _read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        with open(os.path.join(path, "config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise _not_converted(path) from None
    if not isinstance(meta, dict) or "vapjax_component" not in meta:
        raise _not_converted(path)
    return meta


def read_kind(path: str) -> str:
    """The kind of model a converted folder holds."""
    return _read_meta(path)["vapjax_component"]


def read_config(path: str, kind: str) -> Any:
    """The model config of a converted folder holding a `kind`, as its config class."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r} (known: {', '.join(KINDS)})")
    meta = _read_meta(path)
    if meta["vapjax_component"] != kind:
        raise CheckpointError(f"{path}: holds a {meta['vapjax_component']!r}, expected a {kind!r}")
    try:
        return KINDS[kind].from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: not a valid {kind} config ({e})") from None


def load(path: str, kind: str, *, dtype: Any = None,
         sharding: Callable[[tuple[str, ...], tuple[int, ...]], Any] | None = None,
         host: Callable[[tuple[str, ...]], bool] | None = None,
         dtypes: Callable[[tuple[str, ...]], Any] | None = None,
         **options) -> tuple[Any, Any]:
    """(config, params) of a converted `kind` folder. The one dtype contract, for every kind:
    `dtype` (e.g. "bfloat16") is both the weights' dtype (floating arrays are read as it) and the
    config's compute and parameter dtype; None keeps both as stored. `options` replace further config
    fields (run options such as `attention` or `remat`). `sharding(path, shape)` places each array
    straight onto its sharding, memory kind included (default: the first device); arrays for which
    `host(path)` is true are read into host numpy arrays instead (e.g. to be quantised there), never
    touching a device. `dtypes(path)`: a floating array's dtype to read it as (None: by `dtype`)."""
    config = read_config(path, kind)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        options = {**options, "dtype": name, "param_dtype": name}
    if options:
        try:
            config = type(config).from_dict({**config.to_dict(), **options})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot apply {sorted(options)} to a {kind} config ({e})") from None
    params_dir = os.path.join(os.path.abspath(path), "params")
    ckpt = ocp.StandardCheckpointer()
    try:
        tree = ckpt.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises a zoo of types for a missing/corrupt folder
        raise CheckpointError(f"{path}: unreadable parameters ({type(e).__name__})") from None
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read_as(names, m):
        floating = jnp.issubdtype(m.dtype, jnp.floating)
        want = dtypes(names) if dtypes is not None and floating else None
        return jnp.dtype(want if want is not None else dtype if dtype is not None and floating else m.dtype)

    def abstract(keypath, m):
        names = tuple(getattr(k, "key", str(k)) for k in keypath)
        return jax.ShapeDtypeStruct(m.shape, read_as(names, m),
                                    sharding=sharding(names, tuple(m.shape)) if sharding else device)

    if host is None:
        return config, ckpt.restore(params_dir, jax.tree_util.tree_map_with_path(abstract, tree))

    def restore_args(keypath, m):
        names = tuple(getattr(k, "key", str(k)) for k in keypath)
        if host(names):
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=read_as(names, m))
        return ocp.ArrayRestoreArgs(sharding=sharding(names, tuple(m.shape)) if sharding else device,
                                    dtype=read_as(names, m))

    args = ocp.args.PyTreeRestore(restore_args=jax.tree_util.tree_map_with_path(restore_args, tree))
    return config, ocp.PyTreeCheckpointer().restore(params_dir, args=args)
