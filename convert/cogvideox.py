"""CogVideoX(-VAP) transformer: diffusers state dict <-> our {'backbone', 'expert'} tree.

Key names: stock diffusers `CogVideoXTransformer3DModel` for the backbone; the official VAP model
adds the expert under the same names with `_mot_ref` on the module (spec §1.3):
`patch_embed_mot_ref.*`, `time_embedding_mot_ref.*`, `transformer_blocks.{i}.{norm1,attn1,norm2,ff}_mot_ref.*`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from convert.core import (IDENTITY, LINEAR, Path, Rule, Transform, assemble, check, conv_as_linear,
                          flatten_leading, storage_dtype)
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.cogvideox import CogVideoXConfig, param_shapes
from vapjax.tree import flatten as flatten_tree

# Our module path (inside a stream) -> the official module path, longest prefix first.
_MODULES = [
    ("blocks/attn/to_out/", "attn1/to_out/0/"), ("blocks/attn/", "attn1/"),
    ("blocks/ff/proj_in/", "ff/net/0/proj/"), ("blocks/ff/proj_out/", "ff/net/2/"),
    ("blocks/", ""), ("head/", ""),
]
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "pos_embedding": "pos_embedding"}


def _torch_name(path: Path, expert: bool) -> tuple[str, Transform]:
    """(official key without the layer prefix, transform) for one of our stream-relative paths."""
    s = "/".join(path[:-1]) + "/"
    for ours, theirs in _MODULES:
        if s.startswith(ours):
            s = theirs + s[len(ours):]
            break
    module = s.rstrip("/").replace("/", ".")
    if expert:  # the expert's modules carry `_mot_ref`: norm1 -> norm1_mot_ref, patch_embed -> patch_embed_mot_ref
        head, _, rest = module.partition(".")
        module = f"{head}_mot_ref" + (f".{rest}" if rest else "")
    leaf = path[-1]
    if path[-2:] == ("proj", "kernel") and path[0] == "patch_embed":
        transform = conv_as_linear(2)
    elif leaf == "kernel":
        transform = LINEAR
    elif leaf == "pos_embedding":
        transform = flatten_leading(2)      # [1, S, D] buffer -> [S, D]
    else:
        transform = IDENTITY
    name = module + "." + _LEAVES[leaf] if module else _LEAVES[leaf]
    return name, transform


def rules(cfg: CogVideoXConfig, target_shapes: Mapping[Path, Any], expert_from_backbone: bool = False) -> list[Rule]:
    """One rule per parameter slot. `expert_from_backbone`: fill the expert with copies of the
    same-index backbone tensors (the paper's initialisation from a stock checkpoint)."""
    out = []
    for path in target_shapes:
        partition, local = path[0], path[1:]
        is_expert = partition == "expert"
        name, tf = _torch_name(local, expert=is_expert and not expert_from_backbone)
        if local[0] != "blocks":
            out.append(Rule(name, path, None, tf))
            continue
        layers = cfg.expert_layers if is_expert else range(cfg.num_layers)
        out += [Rule(f"transformer_blocks.{layer}.{name}", path, slot, tf) for slot, layer in enumerate(layers)]
    return out


def target_shapes(cfg: CogVideoXConfig) -> dict[Path, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten_tree(param_shapes(cfg)).items()}


def parse_layers(spec: str) -> tuple[int, ...]:
    """'0-40' / '0,10,20' / '0-3,8' -> sorted layer indices."""
    out = set()
    for part in filter(None, spec.replace(" ", "").split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return tuple(sorted(out))


def convert_transformer(src: str, dst: str | None = None, *, init_expert: str | None = None,
                        expert_layers: Sequence[int] | None = None, dtype: Any = None,
                        put: Callable[[Path, np.ndarray], Any] | None = None, check_only: bool = False):
    """Convert a diffusers transformer folder (config.json + safetensors, single or sharded).

    init_expert=None: the expert comes from the checkpoint's `_mot_ref` keys (the official VAP model)
      or, for a stock checkpoint, there is none. init_expert="copy": a stock checkpoint gets an expert
      on `expert_layers` initialised as copies of the backbone. Returns (config, params); writes a
      vapjax checkpoint to `dst` if given. `dtype`: storage dtype of the arrays (default: bf16 for a
      bf16 checkpoint, else fp32), recorded as the config's `dtype` and `param_dtype`. `put(path,
      array)` places arrays (e.g. onto a sharding)."""
    d = read_config(src)
    try:
        cfg = CogVideoXConfig.from_diffusers(d)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{src}/config.json: {e}") from None
    source = TensorSource.open(src)
    has_expert_keys = any("_mot_ref" in k for k in source.keys())
    if init_expert == "copy":
        if has_expert_keys:
            raise ConversionError(f"{src}: already has expert (_mot_ref) weights; drop --init-expert")
        if not expert_layers:
            raise ConversionError("--init-expert copy needs --expert-layers (official: 0-40)")
        cfg = cfg.with_options(expert_layers=tuple(expert_layers))
    elif init_expert is not None:
        raise ConversionError(f"--init-expert {init_expert!r}: only 'copy' is supported")
    elif expert_layers is not None and tuple(expert_layers) != cfg.expert_layers:
        raise ConversionError(f"--expert-layers {tuple(expert_layers)} disagrees with the checkpoint's "
                              f"block_idx_with_mot_ref {cfg.expert_layers}")
    targets = target_shapes(cfg)
    rs = rules(cfg, targets, expert_from_backbone=init_expert == "copy")
    check(source.shapes(), rs, targets, what=src)
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg, None
    dtype = storage_dtype(map(source.dtype, source.keys()), dtype)
    cfg = cfg.with_options(dtype=dtype.name, param_dtype=dtype.name)
    params = assemble(source.load, rs, targets, dtype=dtype, put=put)
    if dst is not None:
        checkpoint.save(dst, params, cfg)
    return cfg, params
