"""CogVideoX transformer: parity with stock diffusers, the converter's strictness, full-size shapes.

Tolerances: fp32 relative error ‖ours − torch‖/‖torch‖ ≤ 1e-5 for a forward.
"""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from benchmarks.flops import lower_forward
from conftest import ROOT, golden_cases, rel_err
from convert.cogvideox import convert_transformer, rules, target_shapes
from convert.core import check
from convert.errors import ConversionError
from vapjax import checkpoint
from vapjax.models import cogvideox
from vapjax.random_init import random_params

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
            text_embed_dim=24, num_layers=3, sample_width=12, sample_height=8, sample_frames=9,
            max_text_seq_length=7, patch_size=2)

# Stock CogVideoX-5B-I2V (spec §1.1).
COG_5B_I2V = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
                  time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                  sample_frames=49, patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                  use_learned_positional_embeddings=True)


def stock_model(tmp_path, seed=0, **overrides):
    """A random tiny stock diffusers model saved to disk. Norm weights 1+0.1·N, others ~N/√fan_in,
    so that no weight is at a trivial value and every mapping mistake shows."""
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def torch_forward(model, latents, text, t):
    """Stock diffusers forward, with the RoPE tables the stock pipeline would pass."""
    c = model.config
    b, f, ch, h, w = latents.shape
    rope = None
    if c.use_rotary_positional_embeddings:
        gh, gw = h // c.patch_size, w // c.patch_size
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // c.patch_size, c.sample_height // c.patch_size)
        rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), f)
    with torch.no_grad():
        out = model(torch.from_numpy(latents), torch.from_numpy(text), torch.from_numpy(t),
                    image_rotary_emb=rope, return_dict=False)[0]
    return out.numpy()


@pytest.mark.parametrize("name,overrides,frames,hw", [
    # CogVideoX-5B-I2V style: learned absolute table + RoPE, at the sample size.
    ("learned_table", dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True), 3, (8, 12)),
    # Other frame count: the learned table silently becomes a sin-cos table (as diffusers does).
    ("learned_table_other_frames", dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True), 2, (8, 12)),
    # RoPE only (CogVideoX-5B T2V style), off the sample grid: exercises the crop-region positions.
    ("rope_only_offgrid", dict(use_rotary_positional_embeddings=True), 2, (12, 8)),
    # No RoPE: 3D sin-cos absolute table (CogVideoX-2B style).
    ("sincos", dict(), 2, (8, 12)),
])
def test_stock_diffusers_parity(tmp_path, name, overrides, frames, hw):
    model = stock_model(tmp_path, **overrides)
    cfg, params = convert_transformer(str(tmp_path))
    assert "expert" not in params and cfg.expert_layers == ()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, frames, TINY["in_channels"], *hw)).astype(np.float32)
    text = rng.standard_normal((2, TINY["max_text_seq_length"], TINY["text_embed_dim"])).astype(np.float32)
    t = np.array([17.0, 901.0], np.float32)
    want = torch_forward(model, latents, text, t)
    got = cogvideox.CogVideoXTransformer(cfg).apply({"params": params}, latents.transpose(0, 1, 3, 4, 2), text, t)
    err = rel_err(np.asarray(got).transpose(0, 1, 4, 2, 3), want)
    print(f"{name}: fp32 relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_learned_table_rejects_other_resolution(tmp_path):
    stock_model(tmp_path, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    cfg, params = convert_transformer(str(tmp_path))
    x = jnp.zeros((1, 3, 8, 8, TINY["in_channels"]))
    with pytest.raises(ValueError, match="learned position table fixes it to 8x12"):
        cogvideox.CogVideoXTransformer(cfg).apply({"params": params}, x, jnp.zeros((1, 7, 24)), jnp.zeros(1))


def test_init_expert_copy_and_roundtrip(tmp_path):
    """--init-expert copy: each expert layer starts as a real copy of the same-index backbone layer;
    the written checkpoint reads back identical."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    stock_model(src, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    cfg, params = convert_transformer(str(src), str(dst), init_expert="copy", expert_layers=(0, 2))
    assert cfg.expert_layers == (0, 2)
    bb, ex = params["backbone"], params["expert"]
    jax.tree.map(lambda e, b: np.testing.assert_array_equal(e, b[np.array([0, 2])]), ex["blocks"], bb["blocks"])
    for part in ("patch_embed", "time_embedding"):
        jax.tree.map(np.testing.assert_array_equal, ex[part], bb[part])
    assert not np.shares_memory(ex["blocks"]["attn"]["to_q"]["kernel"], bb["blocks"]["attn"]["to_q"]["kernel"])

    cfg2, params2 = checkpoint.load(str(dst), "cogvideox_transformer")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def _golden_model_case():
    """The first official CogVideoX-VAP model case (not an ablation, not another family)."""
    cases = [json.loads((c / "case.json").read_text()) for c in golden_cases()]
    return next(c for c, d in zip(golden_cases(), cases)
                if d.get("model") == "CogVideoXTransformer3DMOTModel" and "ablation" not in d)


@pytest.mark.parametrize("edit,message", [
    ("drop", "missing keys: transformer_blocks.1.attn1_mot_ref.to_k.weight"),
    ("add", "unexpected keys: transformer_blocks.1.attn1_mot_ref.extra.weight"),
    ("reshape", "wrong shape: transformer_blocks.1.attn1_mot_ref.to_k.weight (32, 16)"),
])
def test_converter_errors(tmp_path, edit, message):
    case = _golden_model_case()
    sd = load_file(case / "diffusion_pytorch_model.safetensors")
    key = "transformer_blocks.1.attn1_mot_ref.to_k.weight"
    if edit == "drop":
        del sd[key]
    elif edit == "add":
        sd["transformer_blocks.1.attn1_mot_ref.extra.weight"] = np.zeros(3, np.float32)
    else:
        sd[key] = sd[key][:, :16]
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((case / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        convert_transformer(str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli(tmp_path):
    case = _golden_model_case()
    run = lambda *a: subprocess.run([sys.executable, "-m", "convert", *a], cwd=ROOT, capture_output=True, text=True)
    ok = run(str(case), str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    cfg, _ = checkpoint.load(str(tmp_path / "out"), "cogvideox_transformer")
    assert cfg.expert_layers == tuple(json.loads((case / "config.json").read_text())["block_idx_with_mot_ref"])
    bad = run(str(tmp_path / "nope"), str(tmp_path / "out2"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no such folder" in bad.stderr


def test_remat_and_layer_runs():
    """Rematerialisation changes memory, not results; layer runs group consecutive layers."""
    assert cogvideox.layer_runs(42, range(41)) == [(0, 41, True), (41, 42, False)]
    assert cogvideox.layer_runs(5, (1, 2)) == [(0, 1, False), (1, 3, True), (3, 5, False)]
    cfg = cogvideox.CogVideoXConfig.from_diffusers({**TINY, "block_idx_with_mot_ref": [0, 2], "flip_sin_to_cos": True,
        "freq_shift": 0, "temporal_compression_ratio": 4, "norm_eps": 1e-5, "spatial_interpolation_scale": 1.875,
        "temporal_interpolation_scale": 1.0, "use_rotary_positional_embeddings": True})
    params = cogvideox.init_params(cfg, jax.random.PRNGKey(0))
    inputs = cogvideox.dummy_inputs(cfg, batch=1, frames=2)
    inputs = jax.tree.map(lambda x: x + jax.random.normal(jax.random.PRNGKey(1), x.shape), inputs)

    @jax.jit
    def losses_and_grads(expert):
        def loss(expert, c):
            out = cogvideox.CogVideoXTransformer(c).apply({"params": {**params, "expert": expert}}, *inputs)
            return jnp.mean(out ** 2)
        return [jax.value_and_grad(loss)(expert, cfg.with_options(remat=r)) for r in ("none", "full")]

    (l0, g0), *others = losses_and_grads(params["expert"])
    for l, g in others:
        assert abs(l - l0) < 1e-6
        assert max(jax.tree.leaves(jax.tree.map(rel_err, g, g0))) < 1e-5


# ---------------------------------------------------------------------------------------------
# Full size, no weights: official key names and shapes from torch's meta device.
# ---------------------------------------------------------------------------------------------

def official_vap_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict shapes of CogVideoX-5B-I2V + VAP experts on layers 0–40. The backbone comes from
    stock diffusers on the meta device; the expert keys are the official `_mot_ref` names (spec §1.3;
    the golden checkpoints confirm the naming on tiny models)."""
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**COG_5B_I2V)
    stock = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expert = {}
    for k, s in stock.items():
        m = re.match(r"(patch_embed|time_embedding)\.(.*)", k)
        if m:
            expert[f"{m[1]}_mot_ref.{m[2]}"] = s
        m = re.match(r"transformer_blocks\.(\d+)\.(norm1|attn1|norm2|ff)\.(.*)", k)
        if m and int(m[1]) <= 40:
            expert[f"transformer_blocks.{m[1]}.{m[2]}_mot_ref.{m[3]}"] = s
    return {**stock, **expert}


def full_size_config():
    d = {**COG_5B_I2V, "flip_sin_to_cos": True, "freq_shift": 0, "temporal_compression_ratio": 4, "norm_eps": 1e-5,
         "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
         "block_idx_with_mot_ref": list(range(41))}
    return cogvideox.CogVideoXConfig.from_diffusers(d)


def test_full_size_mapping_and_counts():
    cfg = full_size_config()
    assert cfg == cogvideox.CogVideoXConfig()  # our defaults are the official model
    src = official_vap_shapes()
    targets = target_shapes(cfg)
    check(src, rules(cfg, targets), targets, what="CogVideoX-5B-I2V + VAP (meta)")
    # The learned position tables are torch buffers, not parameters: count them apart.
    count = lambda part, tables: sum(int(np.prod(s)) for p, s in targets.items()
                                     if p[0] == part and (p[-1] == "pos_embedding") == tables)
    backbone, expert = count("backbone", False), count("expert", False)
    print(f"parameters: backbone {backbone / 1e9:.3f} B, expert {expert / 1e9:.3f} B; position tables "
          f"{count('backbone', True) / 1e6:.1f} M + {count('expert', True) / 1e6:.1f} M; source tensors {len(src)}")
    assert abs(backbone / 1e9 - 5.57) < 0.005 and abs(expert / 1e9 - 5.4) < 0.05
    # Stock checkpoint + --init-expert copy maps the same way.
    stock = {k: s for k, s in src.items() if "_mot_ref" not in k}
    check(stock, rules(cfg, targets, expert_from_backbone=True), targets, what="CogVideoX-5B-I2V (meta)")


def test_full_size_forward_lowers():
    """jit-lowering of the full-size forward (batch 2, 480×720, 49 frames, one reference) from shapes."""
    lowered = lower_forward(full_size_config().with_options(dtype="bfloat16", param_dtype="bfloat16"))
    assert "while" in lowered.as_text()[:2_000_000]  # the layer stack is scanned, not unrolled


def test_sharded_bf16_source_and_sharding_placement(tmp_path):
    """A sharded `*.index.json` checkpoint in bf16 converts like the single file; arrays can be
    placed straight onto a sharding, and a converted checkpoint loads onto one too."""

    case = _golden_model_case()
    sd = load_file(case / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k].astype(ml_dtypes.bfloat16) for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((case / "config.json").read_text())

    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    replicated = NamedSharding(mesh, PartitionSpec())
    cfg, params = convert_transformer(str(tmp_path), str(tmp_path / "out"),
                                      put=lambda path, a: jax.device_put(a, replicated))
    _, want = convert_transformer(str(case), dtype=ml_dtypes.bfloat16)
    leaves = jax.tree.leaves(params)
    assert all(a.dtype == jnp.bfloat16 and a.sharding == replicated for a in leaves)
    jax.tree.map(np.testing.assert_array_equal, params, want)

    _, loaded = checkpoint.load(str(tmp_path / "out"), "cogvideox_transformer", sharding=lambda path, shape: replicated)
    assert all(a.sharding == replicated for a in jax.tree.leaves(loaded))
    jax.tree.map(np.testing.assert_array_equal, loaded, want)


def test_expert_layers_are_sorted_when_the_config_is_built():
    """Expert slots follow layer order: (2, 0) from the Python API is (0, 2), the same mapping of
    official keys to slots and the same forward; duplicates and out-of-range layers are refused."""
    base = {**TINY, "flip_sin_to_cos": True, "freq_shift": 0, "temporal_compression_ratio": 4, "norm_eps": 1e-5,
            "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
            "use_rotary_positional_embeddings": True}
    cfg = cogvideox.CogVideoXConfig.from_diffusers({**base, "block_idx_with_mot_ref": [0, 2]})
    unsorted = cfg.with_options(expert_layers=(2, 0))
    assert unsorted.expert_layers == (0, 2) and unsorted == cfg
    assert cogvideox.CogVideoXConfig.from_dict({**cfg.to_dict(), "expert_layers": [2, 0]}) == cfg
    rule_map = lambda c: sorted((r.src, r.dst, r.index) for r in rules(c, target_shapes(c)))
    assert rule_map(unsorted) == rule_map(cfg)
    assert ("transformer_blocks.2.attn1_mot_ref.to_q.weight", ("expert", "blocks", "attn", "to_q", "kernel"), 1) in \
        [(r.src, r.dst, r.index) for r in rules(unsorted, target_shapes(unsorted))]
    params = random_params(cogvideox.param_shapes(cfg), 0)
    inputs = [np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
              for x in cogvideox.dummy_inputs(cfg, batch=1, frames=1)]
    forward = jax.jit(lambda p, x, c: cogvideox.CogVideoXTransformer(c).apply({"params": p}, *x), static_argnums=2)
    np.testing.assert_array_equal(forward(params, inputs, unsorted), forward(params, inputs, cfg))
    for bad in ((0, 0), (0, 3), (-1,)):
        with pytest.raises(ValueError, match="must be distinct layers in \\[0, 3\\)"):
            cfg.with_options(expert_layers=bad)
