"""LoRA module names: which of our parameters each PyTorch Linear module of a transformer is.

A LoRA file names PyTorch modules (`transformer_blocks.3.attn1.to_q`, `blocks.0.ffn.net.0.proj`, ...). The
converter's key rules already say where each `<module>.weight` lands in our tree (path, layer slot, and a
transpose), so the LoRA map is read off those rules: every rule with the Linear transform is a module a
LoRA may adapt. Files may also name the layers as the family's original repository does (Wan's
`blocks.0.self_attn.q`): `file_names` adds those. `vapjax.lora` does the math from this map; entry points (sample.py, train.py) build it here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from convert import cogvideox, wan
from convert.core import LINEAR, Path

# transformer kind (vapjax.checkpoint.KINDS) -> (rules(cfg, target_shapes), target_shapes(cfg))
RULES: dict[str, tuple[Callable, Callable]] = {
    "cogvideox_transformer": (cogvideox.rules, cogvideox.target_shapes),
    "wan_transformer": (wan.rules, wan.target_shapes),
}
# transformer kind -> the family's other naming of a diffusers module (or None), which LoRA files may use
OTHER_NAMES: dict[str, Callable[[str], str | None]] = {
    "wan_transformer": wan.original_name,
}


def module_names(kind: str, cfg: Any) -> Mapping[str, tuple[Path, int | None]]:
    """{PyTorch module name: (our kernel path, layer slot or None)} for every Linear layer of the model."""
    if kind not in RULES:
        raise ValueError(f"no LoRA key map for a {kind!r} (known: {', '.join(RULES)})")
    rules, shapes = RULES[kind]
    return {r.src[:-len(".weight")]: (r.dst, r.index) for r in rules(cfg, shapes(cfg)) if r.transform is LINEAR}


def file_names(kind: str, cfg: Any) -> Mapping[str, tuple[Path, int | None]]:
    """`module_names` plus the family's other naming of the same layers (Wan: the original repository's
    `blocks.0.self_attn.q`, `head.head`, ...): every name a LoRA file to read may use. (Export writes the
    diffusers names of `module_names`.)"""
    names = dict(module_names(kind, cfg))
    other = OTHER_NAMES.get(kind, lambda _: None)
    names.update({alias: slot for name, slot in list(names.items()) if (alias := other(name))})
    return names
