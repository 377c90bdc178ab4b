"""LoRA in and out: external diffusers/PEFT and kohya files merged into our weights give the output of the
stock diffusers model with the same LoRA merged PEFT's way; trained factors exported as a diffusers file
read by diffusers' own LoRA loader give the same output in both.

Tolerance: fp32 relative error ≤ 1e-5 for a forward (a wrong transpose, slot, α/r or scale is O(1)).
peft is not installed, so the torch side merges W += (α/r)·B·A into the stock model's Linear weights,
which is what PEFT's merged forward computes.
"""
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from safetensors.numpy import save_file

import test_cogvideox as tc
import test_wan as tw
from conftest import rel_err
from convert.cogvideox import convert_transformer as convert_cog
from convert.lora import module_names
from convert.wan import convert_transformer as convert_wan
from vapjax import lora
from vapjax.models import cogvideox, wan


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
