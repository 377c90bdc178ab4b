"""LoRA in and out: external diffusers/PEFT and kohya files merged into our weights give the output of the
stock diffusers model with the same LoRA merged PEFT's way; trained factors exported as a diffusers file
read by diffusers' own LoRA loader give the same output in both.

Tolerance: fp32 relative error ≤ 1e-5 for a forward (a wrong transpose, slot, α/r or scale is O(1)).
peft is not installed, so the torch side merges W += (α/r)·B·A into the stock model's Linear weights,
which is what PEFT's merged forward computes.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from safetensors.numpy import save_file

import test_cogvideox as tc
import test_wan as tw
from conftest import rel_err
from convert.cogvideox import convert_transformer as convert_cog
from convert.lora import file_names, module_names
from convert.wan import convert_transformer as convert_wan
from vapjax import lora
from vapjax.models import cogvideox, wan
from vapjax.random_init import random_params


def torch_merge(model, updates: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    """PEFT's merge on the stock model: module.weight += s·B·A for {module: (A, B, s)}."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b, s) in updates.items():
            modules[name].weight += float(s) * (torch.from_numpy(np.asarray(b, np.float32)) @ torch.from_numpy(np.asarray(a, np.float32)))


def random_factors(rng, model, names, rank):
    out = {}
    modules = dict(model.named_modules())
    for n in names:
        w = modules[n].weight
        out[n] = (rng.standard_normal((rank, w.shape[1])).astype(np.float32) / np.sqrt(w.shape[1]),
                  rng.standard_normal((w.shape[0], rank)).astype(np.float32) * 0.3)
    return out


def cog_inputs(rng):
    latents = rng.standard_normal((2, 3, tc.TINY["in_channels"], 8, 12)).astype(np.float32)
    text = rng.standard_normal((2, tc.TINY["max_text_seq_length"], tc.TINY["text_embed_dim"])).astype(np.float32)
    return latents, text, np.array([17.0, 901.0], np.float32)


def cog_ours(cfg, params, latents, text, t):
    out = cogvideox.CogVideoXTransformer(cfg).apply({"params": params}, latents.transpose(0, 1, 3, 4, 2), text, t)
    return np.asarray(out).transpose(0, 1, 4, 2, 3)


COG_MODULES = [f"transformer_blocks.{i}.{m}" for i in range(3)
               for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj")] + ["proj_out"]


def test_peft_file_on_cogvideox_matches_diffusers(tmp_path):
    """diffusers naming (`transformer.` prefix), α in diffusers' metadata (α ≠ r), two files with scales."""
    model = tc.stock_model(tmp_path / "m", use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    cfg, params = convert_cog(str(tmp_path / "m"))
    rng = np.random.default_rng(0)
    a = random_factors(rng, model, COG_MODULES, rank=4)
    b = random_factors(rng, model, COG_MODULES[:5], rank=2)
    save_file({f"transformer.{n}.lora_{k}.weight": v for n, (A, B) in a.items() for k, v in (("A", A), ("B", B))},
              str(tmp_path / "a.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})})
    # PEFT's own state-dict naming (no prefix), α as a tensor per module.
    save_file({**{f"{n}.lora_{k}.weight": v for n, (A, B) in b.items() for k, v in (("A", A), ("B", B))},
               **{f"{n}.alpha": np.array(3.0, np.float32) for n in b}}, str(tmp_path / "b.safetensors"))
    specs = lora.parse_spec(f"{tmp_path / 'a.safetensors'}:0.7|{tmp_path / 'b.safetensors'}")
    assert [s for _, s in specs] == [0.7, 1.0]
    got = lora.load_into(params, specs, module_names("cogvideox_transformer", cfg))

    # The diffusers side: the official loader parses file a (prefix, metadata); PEFT merges s·α/r·B·A.
    sd, meta = CogVideoXImageToVideoPipeline.lora_state_dict(str(tmp_path / "a.safetensors"), return_lora_metadata=True)
    alpha = meta.get("transformer.lora_alpha", meta.get("lora_alpha"))
    assert alpha == 8
    torch_merge(model, {n: (sd[f"transformer.{n}.lora_A.weight"].numpy(), sd[f"transformer.{n}.lora_B.weight"].numpy(),
                            0.7 * alpha / 4) for n in a})
    torch_merge(model, {n: (A, B, 3.0 / 2) for n, (A, B) in b.items()})
    latents, text, t = cog_inputs(rng)
    want = tc.torch_forward(model, latents, text, t)
    err = rel_err(cog_ours(cfg, got, latents, text, t), want)
    base = rel_err(cog_ours(cfg, params, latents, text, t), want)
    print(f"CogVideoX + 2 PEFT LoRAs: fp32 relative error vs diffusers {err:.2e} (without the LoRAs: {base:.2e})")
    assert err <= 1e-5 and base > 1e-2


def test_kohya_file_on_wan_matches_diffusers(tmp_path):
    model = tw.stock_model(tmp_path / "m")
    cfg, params = convert_wan(str(tmp_path / "m"))
    names = ["blocks.0.attn1.to_q", "blocks.1.attn2.add_k_proj", "blocks.1.ffn.net.0.proj", "blocks.0.attn2.to_out.0",
             "condition_embedder.text_embedder.linear_1", "proj_out"]
    rng = np.random.default_rng(1)
    f = random_factors(rng, model, names, rank=3)
    tensors = {}
    for n, (A, B) in f.items():
        k = "lora_unet_" + n.replace(".", "_")
        tensors.update({f"{k}.lora_down.weight": A, f"{k}.lora_up.weight": B, f"{k}.alpha": np.array(6.0, np.float32)})
    save_file(tensors, str(tmp_path / "k.safetensors"))
    got = lora.load_into(params, [(str(tmp_path / "k.safetensors"), 0.5)], module_names("wan_transformer", cfg))
    torch_merge(model, {n: (A, B, 0.5 * 6.0 / 3) for n, (A, B) in f.items()})
    x = rng.standard_normal((2, tw.TINY["in_channels"], 4, 4, 6)).astype(np.float32)
    text = rng.standard_normal((2, wan.TEXT_TOKENS, tw.TINY["text_dim"])).astype(np.float32)
    image = rng.standard_normal((2, 5, tw.TINY["image_dim"])).astype(np.float32)
    t = np.array([999.0, 3.0], np.float32)
    with torch.no_grad():
        want = model(*map(torch.from_numpy, (x, t, text, image)), return_dict=False)[0].numpy()
    out = wan.WanTransformer(cfg).apply({"params": got}, x.transpose(0, 2, 3, 4, 1), text, image, t)
    err = rel_err(np.asarray(out).transpose(0, 4, 1, 2, 3), want)
    print(f"Wan + kohya LoRA: fp32 relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_bad_lora_files_are_one_line_errors(tmp_path):
    model = tc.stock_model(tmp_path / "m")
    cfg, params = convert_cog(str(tmp_path / "m"))
    names = module_names("cogvideox_transformer", cfg)
    A, B = random_factors(np.random.default_rng(0), model, ["proj_out"], 2)["proj_out"]
    cases = [
        ({"transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": A,
          "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": B}, "transformer_blocks.7.attn1.to_q is not a Linear"),
        ({"lora_unet_proj_outx.lora_down.weight": A, "lora_unet_proj_outx.lora_up.weight": B}, "proj_outx is not a Linear"),
        ({"proj_out.lora_A.weight": A}, "proj_out has no up"),
        ({"proj_out.weight": A}, "proj_out.weight is neither"),
        ({"proj_out.lora_A.weight": A, "proj_out.lora_B.weight": B[:3]}, "proj_out updates backbone/head/proj_out/kernel of shape \\(32, 16\\) with \\(32, 3\\)"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = str(tmp_path / f"{i}.safetensors")
        save_file(tensors, path)
        with pytest.raises(lora.LoRAError, match=message) as e:
            lora.load_into(params, [(path, 1.0)], names)
        assert "\n" not in str(e.value)
    with pytest.raises(lora.LoRAError, match="no such LoRA file"):
        lora.load_into(params, lora.parse_spec(str(tmp_path / "missing.safetensors:2")), names)


def test_trained_factors_export_to_diffusers(tmp_path):
    """Factors on the official DPO pattern (attention q/k/v/out) of a stock model, exported; diffusers' loader
    reads the file and the PEFT merge reproduces our LoRA forward; our reader gives back the same weights."""
    model = tc.stock_model(tmp_path / "m", use_rotary_positional_embeddings=True)
    cfg, params = convert_cog(str(tmp_path / "m"))
    factors = lora.init(params, r"blocks/attn/(to_q|to_k|to_v|to_out)/kernel", 4, jax.random.key(0))
    assert jax.tree.map(np.shape, factors)["backbone"]["blocks"]["attn"]["to_q"] == \
        {"lora_down": (3, 32, 4), "lora_up": (3, 4, 32)}
    # Zero-initialised B: the LoRA model starts at the base model exactly.
    jax.tree.map(np.testing.assert_array_equal, lora.apply(params, factors, 8.0), params)
    factors = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(1), a.shape), factors)
    ours = lora.apply(params, factors, alpha=8.0)

    names = module_names("cogvideox_transformer", cfg)
    path = str(tmp_path / "export.safetensors")
    modules = lora.export(path, factors, 8.0, names)
    assert len(modules) == 3 * 4
    sd, meta = CogVideoXImageToVideoPipeline.lora_state_dict(path, return_lora_metadata=True)
    assert (meta.get("transformer.r", meta.get("r")), meta.get("transformer.lora_alpha", meta.get("lora_alpha"))) == (4, 8.0)
    torch_merge(model, {n: (sd[f"transformer.{n}.lora_A.weight"].numpy(), sd[f"transformer.{n}.lora_B.weight"].numpy(),
                            8.0 / 4) for n in modules})
    rng = np.random.default_rng(2)
    latents, text, t = cog_inputs(rng)
    want = tc.torch_forward(model, latents, text, t)
    err = rel_err(cog_ours(cfg, ours, latents, text, t), want)
    print(f"exported LoRA: fp32 relative error vs diffusers {err:.2e}")
    assert err <= 1e-5
    back = lora.load_into(params, [(path, 1.0)], names)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), back, ours)  # float32 rounding only


def test_expert_modules_have_mot_names():
    """The MoT model's expert attention is `attn1_mot_ref` (spec §1.3): exported/loaded under that name."""
    cfg = cogvideox.CogVideoXConfig(num_heads=2, head_dim=8, in_channels=8, out_channels=4, time_embed_dim=8,
                                    text_embed_dim=8, num_layers=3, expert_layers=(0, 2))
    names = module_names("cogvideox_transformer", cfg)
    assert names["transformer_blocks.2.attn1_mot_ref.to_q"] == (("expert", "blocks", "attn", "to_q", "kernel"), 1)
    assert names["transformer_blocks.1.attn1.to_out.0"] == (("backbone", "blocks", "attn", "to_out", "kernel"), 1)
    assert "transformer_blocks.1.attn1_mot_ref.to_q" not in names


def wan_inputs(rng):
    """(latents, t, text, image) in torch's layout (the kohya test's shapes)."""
    return (rng.standard_normal((2, tw.TINY["in_channels"], 4, 4, 6)).astype(np.float32), np.array([999.0, 3.0], np.float32),
            rng.standard_normal((2, wan.TEXT_TOKENS, tw.TINY["text_dim"])).astype(np.float32),
            rng.standard_normal((2, 5, tw.TINY["image_dim"])).astype(np.float32))


def wan_ours(cfg, params, inputs):
    x, t, text, image = inputs
    out = wan.WanTransformer(cfg).apply({"params": params}, x.transpose(0, 2, 3, 4, 1), text, image, t)
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_original_wan_naming_matches_diffusers(tmp_path):
    """A LoRA in Wan's original naming (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.alpha`,
    bias deltas `.diff_b`, zeroed norm `.diff`), as community Wan LoRAs are written: diffusers' own
    converter (`_convert_non_diffusers_wan_lora_to_diffusers`, α/r folded into the factors, `diff_b` as
    lora_B.bias) merged into the stock model gives our forward; the same file in kohya's underscored
    form (`lora_unet_blocks_0_cross_attn_k...`) gives the same weights."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers  # noqa: PLC0415
    model = tw.stock_model(tmp_path / "m")
    cfg, params = convert_wan(str(tmp_path / "m"))
    rng = np.random.default_rng(4)
    d, ffn, img = model.config.num_attention_heads * model.config.attention_head_dim, model.config.ffn_dim, \
        model.config.image_dim
    shapes = {"blocks.0.self_attn.q": (d, d), "blocks.1.self_attn.o": (d, d), "blocks.0.cross_attn.k": (d, d),
              "blocks.1.cross_attn.k_img": (d, d), "blocks.1.cross_attn.v_img": (d, d), "blocks.0.ffn.2": (ffn, d),
              "head.head": (d, model.proj_out.out_features), "img_emb.proj.1": (img, img)}
    tensors = {}
    for i, (name, (fan_in, out)) in enumerate(shapes.items()):
        r = 2 + i % 2
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((r, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = 0.3 * rng.standard_normal((out, r)).astype(np.float32)
        if i % 3 != 2 and name.startswith("blocks."):   # (diffusers reads α on the blocks only)
            tensors[f"{name}.alpha"] = np.array(1.5 * r, np.float32)
    for name, n in (("blocks.0.self_attn.q", d), ("blocks.1.ffn.0", ffn), ("blocks.0.cross_attn.v", d)):
        tensors[f"{name}.diff_b"] = 0.2 * rng.standard_normal(n).astype(np.float32)
    tensors["blocks.0.norm3.diff"] = np.zeros(d, np.float32)      # the zeroed norm deltas such files carry
    tensors["blocks.0.norm3.diff_b"] = np.zeros(d, np.float32)
    save_file({f"diffusion_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "orig.safetensors"))
    kohya = {}
    for k, v in tensors.items():
        module, kind = (k[:-len(".lora_down.weight")], "lora_down.weight") if k.endswith(".lora_down.weight") else \
            (k[:-len(".lora_up.weight")], "lora_up.weight") if k.endswith(".lora_up.weight") else k.rsplit(".", 1)
        kohya[f"lora_unet_{module.replace('.', '_')}.{kind}"] = v
    save_file(kohya, str(tmp_path / "kohya.safetensors"))

    names = file_names("wan_transformer", cfg)
    got = lora.load_into(params, [(str(tmp_path / "orig.safetensors"), 0.8)], names)
    jax.tree.map(np.testing.assert_array_equal,
                 lora.load_into(params, [(str(tmp_path / "kohya.safetensors"), 0.8)], names), got)

    sd = _convert_non_diffusers_wan_lora_to_diffusers({f"diffusion_model.{k}": torch.from_numpy(v)
                                                       for k, v in tensors.items()})
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in sd.items():
            module = key[len("transformer."):].rsplit(".lora_", 1)[0]
            if key.endswith("lora_A.weight"):
                modules[module].weight += 0.8 * sd[key.replace("lora_A", "lora_B")] @ value
            elif key.endswith("lora_B.bias"):
                modules[module].bias += 0.8 * value
    inputs = wan_inputs(rng)
    with torch.no_grad():
        want = model(*map(torch.from_numpy, inputs), return_dict=False)[0].numpy()
    err = rel_err(wan_ours(cfg, got, inputs), want)
    print(f"Wan + original-naming LoRA: fp32 relative error vs diffusers {err:.2e}")
    assert err <= 1e-5 and rel_err(wan_ours(cfg, params, inputs), want) > 1e-2   # the LoRA matters
    # Export keeps the diffusers names; a nonzero norm delta is still refused, naming the module.
    assert "blocks.0.self_attn.q" not in module_names("wan_transformer", cfg)
    save_file({"diffusion_model.blocks.0.norm3.diff_b": np.ones(d, np.float32)}, str(tmp_path / "norm.safetensors"))
    with pytest.raises(lora.LoRAError, match="blocks.0.norm3 is not a Linear layer"):
        lora.load_into(params, [(str(tmp_path / "norm.safetensors"), 1.0)], names)


def test_sample_merges_lora_files(tmp_path):
    """sample.py --config.lora=a:2|b: the tiny pipeline's transformer carries both merges; a key of another
    model is a one-line error naming it."""
    import sample  # noqa: PLC0415
    from configs import cog_vap_tiny  # noqa: PLC0415
    c = cog_vap_tiny.get_config()
    base = sample.build_pipeline(c).transformer
    rng = np.random.default_rng(3)
    q = np.asarray(base.params["backbone"]["blocks"]["attn"]["to_q"]["kernel"])   # [L, in, out]
    A, B = rng.standard_normal((2, q.shape[1])).astype(np.float32), rng.standard_normal((q.shape[2], 2)).astype(np.float32)
    save_file({"transformer_blocks.1.attn1.to_q.lora_A.weight": A, "transformer_blocks.1.attn1.to_q.lora_B.weight": B},
              str(tmp_path / "a.safetensors"))
    save_file({"transformer_blocks.1.attn1.to_q.lora_A.weight": A, "transformer_blocks.1.attn1.to_q.lora_B.weight": -B},
              str(tmp_path / "b.safetensors"))
    c.lora = f"{tmp_path / 'a.safetensors'}:2,{tmp_path / 'b.safetensors'}"
    got = np.asarray(sample.build_pipeline(c).transformer.params["backbone"]["blocks"]["attn"]["to_q"]["kernel"])
    want = q.copy()
    want[1] += (2 - 1) * (A.T @ B.T)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # the merge lands on layer 1 only, transposed
    np.testing.assert_array_equal(got[[0] + list(range(2, len(q)))], q[[0] + list(range(2, len(q)))])
    save_file({"transformer_blocks.1.ffn.net.0.proj.lora_A.weight": A, "transformer_blocks.1.ffn.net.0.proj.lora_B.weight": B},
              str(tmp_path / "wan.safetensors"))
    c.lora = str(tmp_path / "wan.safetensors")
    with pytest.raises(ValueError, match=r"transformer_blocks.1.ffn.net.0.proj is not a Linear layer") as e:
        sample.build_pipeline(c)
    assert "\n" not in str(e.value)


def test_bf16_lora_step_survives_in_the_layer():
    """One Adam-sized LoRA step on bf16 weights (the DPO regime: d 1024, r = α = 32, W ~ N(0, 0.02²), A
    kaiming-uniform, B = ±5e-5 after one step at lr 5e-5). Merged into W (`lora.apply`), W + ΔW rounds
    back to W's bf16 grid and the layer's output keeps almost none of x·ΔW; in the layer (`lora.attach` +
    `lora.Dense`, what training uses) the output moves by x·ΔW: its projection on the exact fp32 x·ΔW is ~1.
    (The bf16 output is rounded after the fp32 sum, so the per-element rounding dithers and averages out.)"""
    d, r, n = 1024, 32, 512
    rng = np.random.default_rng(0)
    bf16 = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((n, d)), bf16)
    params = {"layer": {"kernel": jnp.asarray(rng.normal(0, 0.02, (d, d)), bf16), "bias": jnp.zeros((d,), bf16)}}
    factors = {"layer": {"lora_down": jnp.asarray(rng.uniform(-1, 1, (d, r)) / np.sqrt(d), jnp.float32),
                         "lora_up": jnp.asarray(5e-5 * np.sign(rng.standard_normal((r, d))), jnp.float32)}}
    layer = lora.Dense(d, dtype=bf16, param_dtype=bf16)
    out = jax.jit(lambda p: layer.apply({"params": p["layer"]}, x).astype(jnp.float32))
    base = out(params)
    exact = np.asarray(x, np.float32) @ (np.asarray(factors["layer"]["lora_down"]) @ np.asarray(factors["layer"]["lora_up"]))
    kept = lambda p: float(np.sum((out(p) - base) * exact) / np.sum(exact * exact))
    merged, in_layer = kept(lora.apply(params, factors, 32.0)), kept(lora.attach(params, factors, 32.0))
    print(f"bf16, one LoRA step: fraction of x·ΔW kept merged {merged:.3f}, in the layer {in_layer:.3f}")
    assert abs(merged) < 0.2 and abs(in_layer - 1) < 0.1
    # Without factors the layer is nn.Dense exactly.
    np.testing.assert_array_equal(base, nn.Dense(d, dtype=bf16, param_dtype=bf16).apply(
        {"params": params["layer"]}, x).astype(jnp.float32))


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_attached_factors_equal_the_merge_in_both_families(family):
    """The training LoRA on every Linear kernel of a tiny random model: `lora.attach` (the layers add
    (α/r)·(x·A)·B) gives the float32 merged model's output (`lora.apply`) within 1e-5 relative."""
    rng = np.random.default_rng(0)
    if family == "cogvideox":
        cfg = cogvideox.CogVideoXConfig(num_heads=2, head_dim=16, in_channels=8, out_channels=4, time_embed_dim=8,
                                        text_embed_dim=8, num_layers=3, sample_height=4, sample_width=6,
                                        sample_frames=5, max_text_seq_length=5, use_learned_pos=False,
                                        expert_layers=(0, 2))
        params = random_params(cogvideox.param_shapes(cfg), 0)
        x = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 2, 4, 6, 8), (1, 5, 8)))
        inputs = (*x, jnp.array([300.0]), *x)
        fwd = lambda p: cogvideox.CogVideoXTransformer(cfg).apply({"params": p}, *inputs)
    else:
        cfg = wan.WanConfig(num_heads=2, head_dim=8, in_channels=12, out_channels=4, text_dim=8, image_dim=8,
                            freq_dim=8, ffn_dim=16, num_layers=2, expert_layers=(1,))
        params = random_params(wan.param_shapes(cfg), 0)
        lat = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 12)), jnp.float32)
        txt = jnp.asarray(rng.standard_normal((1, wan.TEXT_TOKENS, 8)), jnp.float32)
        img = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32)
        fwd = lambda p: wan.WanTransformer(cfg).apply({"params": p}, lat, txt, img, jnp.array([300.0]), lat, txt, img, 1)
    factors = lora.init(params, r"kernel$", 2, jax.random.key(0))
    factors = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), factors)
    want = fwd(lora.apply(params, factors, 4.0))
    err = rel_err(np.asarray(fwd(lora.attach(params, factors, 4.0))), np.asarray(want))
    assert err <= 1e-5 and rel_err(np.asarray(fwd(params)), np.asarray(want)) > 1e-2, err
