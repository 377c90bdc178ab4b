"""Wan2.1(-VAP) transformer: diffusers state dict <-> our {'backbone', 'expert'} tree.

Key names: stock diffusers `WanTransformer3DModel` for the backbone; the official VAP model
(`WanTransformer3DMOTModel`) adds the expert under the same names with `_mot_ref` on the module
(spec §6.3): `patch_embedding_mot_ref.*`, `condition_embedder_mot_ref.*`,
`blocks.{i}.{attn1,attn2,norm2,ffn}_mot_ref.*`, `blocks.{i}.scale_shift_table_mot_ref`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from convert.core import (IDENTITY, LINEAR, Path, Rule, Transform, assemble, check, conv_as_linear,
                          flatten_leading, storage_dtype)
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.wan import WanConfig, param_shapes
from vapjax.tree import flatten as flatten_tree
from vapjax.tree import merge

# Our module path (inside a stream) -> the official module path, longest prefix first.
_MODULES = [
    ("blocks/attn1/to_out/", "attn1/to_out/0/"), ("blocks/attn2/to_out/", "attn2/to_out/0/"),
    ("blocks/ffn/proj_in/", "ffn/net/0/proj/"), ("blocks/ffn/proj_out/", "ffn/net/2/"),
    ("condition_embedder/image_embedder/proj_in/", "condition_embedder/image_embedder/ff/net/0/proj/"),
    ("condition_embedder/image_embedder/proj_out/", "condition_embedder/image_embedder/ff/net/2/"),
    ("blocks/", ""), ("head/", ""),
]
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "scale_shift_table": "scale_shift_table"}
# Keys the official loader itself drops (WAN:743, `_keys_to_ignore_on_load_unexpected`): an unused
# image-query norm some converted Wan checkpoints carry.
_IGNORED = re.compile(r"(^|\.)norm_added_q\.")


# Wan's original module names (the Wan2.1 repository's, which most community LoRAs use:
# `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `lora_unet_blocks_0_cross_attn_k...`) for
# the backbone's Linear layers: (pattern over the diffusers name, the original name).
_ORIGINAL_NAMES = [
    (r"blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.add_([kv])_proj", r"blocks.\1.cross_attn.\2_img"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
    (r"proj_out", "head.head"),
]


def original_name(module: str) -> str | None:
    """The Wan2.1 repository's name of a diffusers Linear module (`blocks.3.attn2.add_k_proj` ->
    `blocks.3.cross_attn.k_img`), or None (the VAP expert's modules exist only under diffusers names)."""
    for pattern, original in _ORIGINAL_NAMES:
        if re.fullmatch(pattern, module):
            return re.sub(pattern, original, module)
    return None


def _torch_name(path: Path, expert: bool) -> tuple[str, Transform]:
    """(official key without the layer prefix, transform) for one of our stream-relative paths."""
    s = "/".join(path[:-1]) + "/"
    for ours, theirs in _MODULES:
        if s.startswith(ours):
            s = theirs + s[len(ours):]
            break
    module = s.rstrip("/").replace("/", ".")
    leaf = _LEAVES[path[-1]]
    if expert:  # `_mot_ref` on the first component (attn1 -> attn1_mot_ref) or on a block's modulation table
        if module:
            head, _, rest = module.partition(".")
            module = f"{head}_mot_ref" + (f".{rest}" if rest else "")
        else:
            leaf += "_mot_ref"
    if path[0] == "patch_embedding" and path[-1] == "kernel":
        transform = conv_as_linear(3)
    elif path[-1] == "kernel":
        transform = LINEAR
    elif path[-1] == "scale_shift_table":
        transform = flatten_leading(2)      # [1, n, D] -> [n, D]
    else:
        transform = IDENTITY
    return (f"{module}.{leaf}" if module else leaf), transform


def rules(cfg: WanConfig, target_shapes: Mapping[Path, Any], expert_from_backbone: bool = False) -> list[Rule]:
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
        out += [Rule(f"blocks.{layer}.{name}", path, slot, tf) for slot, layer in enumerate(layers)]
    return out


def target_shapes(cfg: WanConfig) -> dict[Path, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten_tree(param_shapes(cfg)).items()}


def source_shapes(source: TensorSource) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in source.shapes().items() if not _IGNORED.search(k)}


def convert_transformer(src: str, dst: str | None = None, *, init_expert: str | None = None,
                        expert_layers: Sequence[int] | None = None, dtype: Any = None,
                        put: Callable[[Path, np.ndarray], Any] | None = None, check_only: bool = False):
    """Convert a diffusers Wan transformer folder (config.json + safetensors, single or sharded).

    init_expert=None: the expert comes from the checkpoint's `_mot_ref` keys (the official VAP model)
      or, for a stock checkpoint, there is none. init_expert="copy": a stock checkpoint gets an expert
      on `expert_layers` initialised as copies of the backbone. Returns (config, params); writes a
      vapjax checkpoint to `dst` if given. `dtype`: storage dtype (default: bf16 for a bf16
      checkpoint, else fp32), recorded as the config's `dtype` and `param_dtype`; the fp32 islands of
      the official bf16 inference (time embedders, backbone modulation tables and cross-attention
      norms, image-embedder norms) stay float32, read from the source at its own precision (loading
      with `checkpoint.load(..., dtype=...)` casts them too, by the house dtype contract).
      `put(path, array)` places arrays (e.g. onto a sharding)."""
    d = read_config(src)
    try:
        cfg = WanConfig.from_diffusers(d)
    except KeyError as e:
        raise ConversionError(f"{src}/config.json: missing field {e}") from None
    except ValueError as e:
        raise ConversionError(f"{src}/config.json: {e}") from None
    source = TensorSource.open(src)
    shapes = source_shapes(source)
    has_expert_keys = any("_mot_ref" in k for k in shapes)
    if init_expert == "copy":
        if has_expert_keys:
            raise ConversionError(f"{src}: already has expert (_mot_ref) weights; drop --init-expert")
        if not expert_layers:
            raise ConversionError("--init-expert copy needs --expert-layers, e.g. 0,4,8,12,16,20,24,28,32,36 "
                                  "(the official lists: every 4th, every 2nd or all 40 layers)")
        cfg = cfg.with_options(expert_layers=tuple(expert_layers))
    elif init_expert is not None:
        raise ConversionError(f"--init-expert {init_expert!r}: only 'copy' is supported")
    elif expert_layers is not None and tuple(expert_layers) != cfg.expert_layers:
        raise ConversionError(f"--expert-layers {tuple(expert_layers)} disagrees with the checkpoint's "
                              f"block_idx_with_mot_ref {cfg.expert_layers}")
    targets = target_shapes(cfg)
    rs = rules(cfg, targets, expert_from_backbone=init_expert == "copy")
    check(shapes, rs, targets, what=src)
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg, None
    dtype = storage_dtype(map(source.dtype, shapes), dtype)
    cfg = cfg.with_options(dtype=dtype.name, param_dtype=dtype.name)
    # Which parameters the model keeps in float32 whatever the storage dtype: ask the model itself.
    island = ({p for p, s in flatten_tree(param_shapes(cfg)).items() if s.dtype == jnp.float32}
              if dtype != np.float32 else set())
    parts = []
    for keep_fp32 in (False, True):
        sub = {p: s for p, s in targets.items() if (p in island) == keep_fp32}
        if sub:
            parts.append(assemble(source.load, [r for r in rs if r.dst in sub], sub,
                                  dtype=np.float32 if keep_fp32 else dtype, put=put))
    params = merge(*parts)
    if dst is not None:
        checkpoint.save(dst, params, cfg)
    return cfg, params
