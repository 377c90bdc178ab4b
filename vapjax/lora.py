"""LoRA in and out: low-rank updates W' = W + s·(α/r)·B·A of the transformer's Linear layers.

Two uses:
- *External LoRAs* (sample.py --config.lora): a diffusers/PEFT file (`<module>.lora_A.weight` [r, in],
  `<module>.lora_B.weight` [out, r], optional `<module>.alpha` or diffusers' `lora_adapter_metadata`) or a
  kohya file (`lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`) is
  merged into the weights once. Module names are the official PyTorch ones; which of our parameters (and
  which layer slot of a stacked one) a module is comes from a `names` map {torch module: (path, slot)}
  built by the converter's key rules (convert/lora.py; the runtime never imports convert/).
- *LoRA training* (config `lora`): trainable float32 factors for the Linear kernels whose path matches a
  regex, kept in our layout — `lora_down` [..., in, r] = Aᵀ, `lora_up` [..., r, out] = Bᵀ beside each
  kernel [..., in, out] (a leading layer axis for stacked blocks). Inside the step they are *not* merged
  into the weights: `attach` puts them beside their kernels and the models' `Dense` computes
  y = x·W + (α/r)·(x·Aᵀ)·Bᵀ. A merge into bf16 weights would round W + ΔW back to W's bf16 grid, where an
  Adam-sized ΔW (~1e-4 of W) mostly vanishes, and would build a full-size ΔW and its gradient per kernel.
  `export` writes the factors as a diffusers/PEFT file that the official pipeline loads with
  `load_lora_weights`; `apply` merges them (float32 weights, export checks).

Our Dense kernels are torch's weight transposed, so the merged kernel update is s·(α/r)·Aᵀ·Bᵀ.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vapjax import tree as vtree

Path = vtree.Path
Slot = tuple[Path, "int | None"]     # (kernel path, layer slot of a stacked kernel or None)
METADATA_KEY = "lora_adapter_metadata"   # diffusers' safetensors metadata entry (r, lora_alpha, ...)
EXPORT_PREFIX = "transformer"            # a pipeline-level diffusers LoRA file prefixes the transformer's keys


class LoRAError(ValueError):
    """A LoRA file or spec that cannot be applied (one line, naming the key)."""


@dataclasses.dataclass(frozen=True)
class Update:
    """One module's update in PyTorch layout: a low-rank pair down = A [r, in], up = B [out, r] (scaled
    α/r), and/or the original-Wan community format's full deltas, `diff` [out, in] of the weight and
    `diff_b` [out] of the bias (added as they are)."""
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float = 1.0
    name: str = ""          # the module's name in the file (for error messages)
    diff: np.ndarray | None = None
    diff_b: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def weight_delta(self) -> np.ndarray | None:
        """The kernel update [in, out] (our kernels are torch's weight transposed), float32, or None."""
        parts = ([(self.alpha / self.rank) * (self.down.T @ self.up.T)] if self.down is not None else []) + \
                ([self.diff.T] if self.diff is not None else [])
        return sum(parts[1:], parts[0]) if parts else None


# ---------------------------------------------------------------------------------------------
# Reading external LoRA files
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.")
_PEFT = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.weight$")
_PEFT_OTHER = re.compile(r"^(?P<module>.+)\.(?P<kind>alpha|diff|diff_b)$")
_KOHYA = re.compile(r"^lora_(?:unet|transformer)_(?P<module>[^.]+)\."
                    r"(?P<kind>lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)$")
_KINDS = {"lora_A": "down", "lora_down": "down", "lora_down.weight": "down", "lora_B": "up", "lora_up": "up",
          "lora_up.weight": "up", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """'a.safetensors:0.8,b.safetensors' (or |-separated) -> [(path, scale)]; scale defaults to 1."""
    out = []
    for item in filter(None, (s.strip() for s in re.split(r"[,|]", spec or ""))):
        path, sep, scale = item.rpartition(":")
        if not sep or not re.fullmatch(r"[-+0-9.eE]+", scale):
            path, scale = item, "1"
        try:
            out.append((path, float(scale)))
        except ValueError:
            raise LoRAError(f"--config.lora {item!r}: the scale after ':' must be a number") from None
    return out


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def read(path: str) -> dict[str, Update]:
    """{module name: Update} of a diffusers/PEFT, kohya or original-Wan (`diffusion_model.blocks.0.
    self_attn.q.lora_down.weight`, `.diff`, `.diff_b`) safetensors file. Kohya names keep their
    underscores (`resolve` maps them); α defaults to the rank (scale 1) as PEFT's does. A module whose
    only entries are all-zero `diff`/`diff_b` (the zeroed norm deltas such files carry) changes nothing
    and is left out."""
    from safetensors import safe_open  # noqa: PLC0415  (optional dependency of the runtime)
    try:
        with safe_open(path, "np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise LoRAError(f"{path}: no such LoRA file") from None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise LoRAError(f"{path}: not a safetensors LoRA file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    adapter = {}
    if meta.get(METADATA_KEY):
        adapter = {_strip(k): v for k, v in json.loads(meta[METADATA_KEY]).items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KOHYA.match(key) or _PEFT.match(_strip(key)) or _PEFT_OTHER.match(_strip(key))
        if not m:
            raise LoRAError(f"{path}: {key} is neither a diffusers/PEFT (lora_A/lora_B), a kohya (lora_down/lora_up) "
                            "nor an original-Wan (diff, diff_b) LoRA key")
        parts.setdefault(m["module"], {})[_KINDS[m["kind"]]] = np.asarray(value, np.float32)
    out = {}
    for module, p in parts.items():
        deltas = {"diff", "diff_b"} & set(p)
        if "down" not in p and "up" not in p and deltas and not any(np.any(p[k]) for k in deltas):
            continue  # zero deltas: nothing to apply
        if ("down" in p) != ("up" in p) or not ({"down"} | deltas) & set(p):
            raise LoRAError(f"{path}: module {module} has {'no up (lora_B)' if 'down' in p else 'no down (lora_A)'} "
                            "weight")
        down, up = p.get("down"), p.get("up")
        if down is not None and (down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]):
            raise LoRAError(f"{path}: module {module} has down {down.shape} and up {up.shape}, not [r, in] and [out, r]")
        alpha = p.get("alpha")
        if alpha is None and down is not None:
            alpha = adapter.get("alpha_pattern", {}).get(module, adapter.get("lora_alpha", down.shape[0]))
        out[module] = Update(down, up, 1.0 if alpha is None else float(np.asarray(alpha).reshape(())), module,
                             p.get("diff"), p.get("diff_b"))
    return out


def resolve(updates: Mapping[str, Update], names: Mapping[str, Slot], what: str = "LoRA") -> dict[Slot, Update]:
    """{(path, slot): Update}: each module name (PyTorch dotted, or kohya's underscored form) looked up
    in `names`; a module that is no Linear layer of this model is an error naming it."""
    kohya = {n.replace(".", "_"): n for n in names}
    out = {}
    for module, u in updates.items():
        name = module if module in names else kohya.get(module)
        if name is None:
            raise LoRAError(f"{what}: {module} is not a Linear layer of this transformer")
        if names[name] in out:
            raise LoRAError(f"{what}: {module} and {out[names[name]].name} are the same layer")
        out[names[name]] = u
    return out


def merge(params: Mapping, updates: Mapping[Slot, Update], scale: float = 1.0, what: str = "LoRA") -> dict:
    """params with W[slot] += scale·(α/r·(B·A) + diff)ᵀ and b[slot] += scale·diff_b for each update,
    summed in float32 and cast back; one addition per parameter (all layer slots of a stacked kernel at
    once)."""
    flat = dict(vtree.flatten(params))
    deltas: dict[Path, np.ndarray] = {}

    def add(path, slot, d, u, label):
        w = flat.get(path)
        if w is None:
            raise LoRAError(f"{what}: {u.name} has a {label}, but {vtree.path_str(path)} does not exist")
        have = tuple(w.shape[1:] if slot is not None else w.shape)
        if d.shape != have:
            raise LoRAError(f"{what}: {u.name} updates {vtree.path_str(path)} of shape {have} with {d.shape}")
        delta = deltas.setdefault(path, np.zeros(w.shape, np.float32))
        delta[() if slot is None else slot] += scale * d

    for (path, slot), u in updates.items():
        d = u.weight_delta()
        if d is not None:
            add(path, slot, d, u, "weight update")
        if u.diff_b is not None:
            add(path[:-1] + ("bias",), slot, u.diff_b, u, "bias update (diff_b)")
    for path, delta in deltas.items():
        w = flat[path]
        flat[path] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
    return vtree.unflatten(flat)


def load_into(params: Mapping, specs: Sequence[tuple[str, float]], names: Mapping[str, Slot]) -> dict:
    """Merge every (file, scale) of `parse_spec` into params, in order."""
    for path, scale in specs:
        params = merge(params, resolve(read(path), names, what=path), scale, what=path)
    return params


# ---------------------------------------------------------------------------------------------
# Training LoRA factors
# ---------------------------------------------------------------------------------------------

def target_paths(params: Mapping, targets: str) -> list[Path]:
    """Linear kernels (leaf `kernel`, 2-D per layer) whose path matches the regex `targets`."""
    flat = vtree.flatten(params)
    out = [p for p, a in flat.items() if p[-1] == "kernel" and np.ndim(a) - ("blocks" in p) == 2
           and re.search(targets, vtree.path_str(p))]
    if not out:
        raise LoRAError(f"lora.targets {targets!r} matches no Linear kernel of the model")
    return out


def init(params: Mapping, targets: str, rank: int, rng: jax.Array) -> dict:
    """Trainable factors for the matched kernels, initialised as PEFT's default: A ~ kaiming-uniform
    (a=√5, i.e. U(±1/√in)), B = 0 — the merged model starts exactly at the base weights. Float32."""
    flat = vtree.flatten(params)
    out = {}
    for i, p in enumerate(target_paths(params, targets)):
        *lead, fan_in, fan_out = flat[p].shape
        bound = 1.0 / math.sqrt(fan_in)
        out[p[:-1] + ("lora_down",)] = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, fan_in, rank),
                                                         jnp.float32, -bound, bound)
        out[p[:-1] + ("lora_up",)] = jnp.zeros((*lead, rank, fan_out), jnp.float32)
    return vtree.unflatten(out)


class Dense(nn.Dense):
    """nn.Dense, plus a low-rank update when `lora_down` [in, r] and `lora_up` [r, out] sit beside its
    kernel (`attach`): y = x·W + (x·down)·up + b. The factors are cast to the compute dtype like W, both
    products accumulate in float32 and the output is rounded once, so an update far below W's bf16
    resolution still moves y (a bf16 y rounded before the addition would drop it again). Without the
    factors this is nn.Dense exactly."""

    def __call__(self, x):
        if not self.has_variable("params", "lora_down"):
            return super().__call__(x)
        dt = self.dtype or x.dtype
        get = lambda name: self.get_variable("params", name).astype(dt)
        x = x.astype(dt)
        dot = lambda a, w, out=None: jax.lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())),
                                                         precision=self.precision, preferred_element_type=out)
        y = dot(x, get("kernel"), jnp.float32) + dot(dot(x, get("lora_down")), get("lora_up"), jnp.float32)
        if self.use_bias:
            y = y + get("bias").astype(jnp.float32)
        return y.astype(dt)


FACTORS = ("lora_down", "lora_up")


def stacked_param(module: nn.Module, name: str, init) -> dict:
    """`module.param(name, init)` for a parameter that is a whole tree (a stream's layer stack), which
    may carry LoRA factors beside its kernels (`attach`). Flax checks a stored parameter against its
    initializer's shapes leaf by leaf, which the extra leaves would misalign; this checks the same with
    the factors left out."""
    if not module.has_variable("params", name):
        return module.param(name, init)
    value = module.get_variable("params", name)
    plain = vtree.unflatten({p: a for p, a in vtree.flatten(value).items() if p[-1] not in FACTORS})
    want = jax.eval_shape(init, jax.random.key(0))
    for have, expect in zip(jax.tree.leaves(plain), jax.tree.leaves(want)):
        if np.shape(have) != np.shape(expect):
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(have), np.shape(expect))
    return value


def attach(params: Mapping, factors: Mapping, alpha: float, scale: float = 1.0) -> dict:
    """params with each factored kernel's `lora_down` and scale·(α/r)·`lora_up` beside it, for `Dense`
    (the training-time LoRA: differentiable in the factors, no full-size ΔW). `factors` = `init`'s tree."""
    flat = dict(vtree.flatten(params))
    for p, a in vtree.flatten(factors).items():
        if p[:-1] + ("kernel",) not in flat:
            raise LoRAError(f"LoRA factor {vtree.path_str(p)} has no kernel beside it")
        rank = a.shape[-1] if p[-1] == "lora_down" else a.shape[-2]
        flat[p] = a if p[-1] == "lora_down" else a * (scale * alpha / rank)
    return vtree.unflatten(flat)


def apply(params: Mapping, factors: Mapping, alpha: float, scale: float = 1.0) -> dict:
    """params with each factored kernel merged, W + scale·(α/r)·down·up, in float32 and cast back to W's
    dtype (export and float32 checks; a bf16 W loses small updates here, so training uses `attach`).
    `factors` = `init`'s tree; with all `up` zero this is `params` exactly."""
    flat = dict(vtree.flatten(params))
    lora = vtree.flatten(factors)
    for p, down in lora.items():
        if p[-1] != "lora_down":
            continue
        up = lora[p[:-1] + ("lora_up",)]
        k = p[:-1] + ("kernel",)
        w = flat[k]
        delta = jnp.einsum("...ir,...ro->...io", down, up) * (scale * alpha / down.shape[-1])
        flat[k] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return vtree.unflatten(flat)


def export(path: str, factors: Mapping, alpha: float, names: Mapping[str, Slot]) -> list[str]:
    """Write the factors as a diffusers/PEFT LoRA file (`transformer.<module>.lora_A/B.weight`, r and
    lora_alpha in diffusers' metadata) that `pipe.load_lora_weights(path)` reads. Returns the module names."""
    from safetensors.numpy import save_file  # noqa: PLC0415
    inverse = {v: k for k, v in names.items()}
    lora = vtree.flatten(factors)
    tensors, modules, rank = {}, [], None
    for p, down in lora.items():
        if p[-1] != "lora_down":
            continue
        k = p[:-1] + ("kernel",)
        down, up = np.asarray(down, np.float32), np.asarray(lora[p[:-1] + ("lora_up",)], np.float32)
        rank = down.shape[-1]
        slots = [(k, None)] if (k, None) in inverse else [(k, i) for i in range(down.shape[0])]
        for slot in slots:
            if slot not in inverse:
                raise LoRAError(f"{vtree.path_str(k)} has no PyTorch module name to export under")
            d, u = (down, up) if slot[1] is None else (down[slot[1]], up[slot[1]])
            name = inverse[slot]
            tensors[f"{EXPORT_PREFIX}.{name}.lora_A.weight"] = np.ascontiguousarray(d.T)
            tensors[f"{EXPORT_PREFIX}.{name}.lora_B.weight"] = np.ascontiguousarray(u.T)
            modules.append(name)
    meta = {f"{EXPORT_PREFIX}.r": rank, f"{EXPORT_PREFIX}.lora_alpha": alpha,
            f"{EXPORT_PREFIX}.target_modules": sorted(modules)}
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    return modules
