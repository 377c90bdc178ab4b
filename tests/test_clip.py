"""CLIP vision tower, its converter and its preprocessing: parity with transformers and the Wan golden."""
import copy
import json
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ROOT, golden_dir, rel_err
from convert.__main__ import convert_folder
from vapjax import checkpoint
from convert.clip import POSITION_IDS, VISION, convert_clip, key_prefix, rules, target_shapes
from convert.core import check
from convert.errors import ConversionError
from vapjax.clip_preprocess import CLIPPreprocessConfig, preprocess
from vapjax.models.clip import CLIPVisionConfig, CLIPVisionEncoder, image_embeds, param_shapes
from vapjax.video import read_image

import torch  # noqa: E402 (test-only references)
import transformers  # noqa: E402

GOLDEN = golden_dir() / "wan_pipeline_tiny"

VARIANTS = {  # name: (model class, config overrides)
    # ViT-H/14-like: exact GELU, no projection, image a multiple of the patch.
    "vit_h_like": ("CLIPVisionModel", dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                           num_hidden_layers=3, patch_size=4, image_size=16, hidden_act="gelu")),
    # OpenAI-like: quick GELU, a projection, and an image size the patch does not divide (conv floors).
    "openai_proj": ("CLIPVisionModelWithProjection", dict(
        hidden_size=24, num_attention_heads=3, intermediate_size=48, num_hidden_layers=2, patch_size=5,
        image_size=22, hidden_act="quick_gelu", projection_dim=12)),
}


def _randomize(model, seed):
    """Weights far from transformers' init: norm scales 1+0.1N, matrices N/sqrt(fan_in), biases 0.1N."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif "position_embedding" in name or "class_embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.prod(p.shape[1:]) ** 0.5)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, its save_pretrained folder, our converted folder)."""
    out = {}
    for seed, (name, (model_cls, kw)) in enumerate(VARIANTS.items()):
        model = getattr(transformers, model_cls)(transformers.CLIPVisionConfig(**kw)).eval()
        _randomize(model, seed)
        src, dst = tmp_path_factory.mktemp(f"{name}_hf"), tmp_path_factory.mktemp(f"{name}_jax")
        model.save_pretrained(src)
        assert convert_folder(str(src), str(dst)) == model_cls  # through `python -m convert`'s dispatch
        out[name] = (model, src, dst)
    return out


def _pixels(size, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)  # NCHW


# ---------------------------------------------------------------- model parity with transformers

@partial(jax.jit, static_argnums=0)
def _outputs(cfg, params, x):
    """Every output of ours that transformers has: hidden states after k layers for every k, the
    pooled output and, with a projection, the projected one."""
    model, variables = CLIPVisionEncoder(cfg), {"params": params}
    hidden = [model.apply(variables, x, layers=k) for k in range(cfg.num_layers + 1)]
    pooled = model.apply(variables, hidden[-1], method=CLIPVisionEncoder.pool)
    projected = model.apply(variables, pooled, method=CLIPVisionEncoder.project) if cfg.projection_dim else None
    return hidden, pooled, projected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_with_transformers(tiny, name):
    model, _, dst = tiny[name]
    cfg, params = load_clip(str(dst))
    pixels = _pixels(cfg.image_size)
    with torch.no_grad():
        want = model(torch.tensor(pixels), output_hidden_states=True)
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    hidden, pooled, projected = _outputs(cfg, params, x)
    errs = {f"hidden_states[{k}]": rel_err(h, w.numpy())  # after k layers (0 = embeddings + pre-norm)
            for k, (h, w) in enumerate(zip(hidden, want.hidden_states, strict=True))}
    errs["last_hidden_state"] = rel_err(hidden[-1], want.last_hidden_state.numpy())
    if cfg.projection_dim:
        errs["image_embeds (projection)"] = rel_err(projected, want.image_embeds.numpy())
    else:
        errs["pooler_output"] = rel_err(pooled, want.pooler_output.numpy())
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5


def test_config_round_trip(tiny):
    _, src, dst = tiny["openai_proj"]
    cfg = load_clip(str(dst))[0]
    assert cfg.projection_dim == 12 and cfg.grid == 4 and cfg.num_tokens == 17
    assert CLIPVisionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert CLIPVisionConfig.from_transformers(json.loads((src / "config.json").read_text()),
                                              with_projection=True) == cfg


def test_vit_h_14_plan_at_full_size():
    """The converter's plan for the real ViT-H/14 (shapes only: transformers on the meta device,
    ours by eval_shape) and the 257 x 1280 penultimate output Wan conditions on."""
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                           num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.CLIPVisionModel(hf_cfg).state_dict().items()}
    cfg = CLIPVisionConfig()  # the defaults are ViT-H/14
    assert cfg == CLIPVisionConfig.from_transformers(hf_cfg.to_dict())
    check(shapes, rules(cfg, key_prefix(shapes)), target_shapes(cfg))
    out = jax.eval_shape(partial(image_embeds, cfg), param_shapes(cfg), jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 257, 1280)


def test_wrong_pixel_size_is_one_line(tiny):
    cfg, params = load_clip(str(tiny["vit_h_like"][2]))
    with pytest.raises(ValueError, match=r"pixels must be \[B, 16, 16, 3\] \(preprocessed\), got \(1, 3, 16, 16\)"):
        image_embeds(cfg, params, jnp.zeros((1, 3, 16, 16)))


def test_bfloat16_close_to_float32(tiny):
    model, _, dst = tiny["vit_h_like"]
    cfg16, p16 = load_clip(str(dst), dtype="bfloat16")
    pixels = _pixels(cfg16.image_size)
    got = image_embeds(cfg16, p16, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert got.dtype == jnp.bfloat16 and p16["blocks"]["ffn"]["fc1"]["kernel"].dtype == jnp.bfloat16
    with torch.no_grad():  # fp32 reference, and transformers' own bfloat16 error on the same model for scale
        want = model(torch.tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()
        hf16 = copy.deepcopy(model).to(torch.bfloat16)(torch.tensor(pixels).bfloat16(), output_hidden_states=True)
    err, hf_err = rel_err(got.astype(jnp.float32), want), rel_err(hf16.hidden_states[-2].float().numpy(), want)
    print(f"bf16 vs fp32 rel err: ours {err:.2e}, transformers {hf_err:.2e}")
    assert err <= 0.05 and err <= 2 * hf_err


# ---------------------------------------------------------------- converter

def _write_variant(tiny, tmp_path, edit, prefix=""):
    """The plain tiny model's file with its keys prefixed by `prefix`, then edited."""
    _, src, _ = tiny["vit_h_like"]
    tensors = {prefix + k.removeprefix(VISION): v for k, v in load_file(src / "model.safetensors").items()}
    edit(tensors)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    return str(tmp_path)


# transformers >= 5 saves a CLIPVisionModel without the `vision_model.` prefix (4.x, the golden and
# the Wan repos have it); the tiny plain model here is saved by the installed version.
Q1 = "encoder.layers.1.self_attn.q_proj.weight"
FC1 = "encoder.layers.0.mlp.fc1.weight"
EXTRA = "encoder.layers.3.self_attn.q_proj.weight"
PROJ = "visual_projection.weight"


@pytest.mark.parametrize("edit,key,what", [
    (lambda t: t.pop(Q1), Q1, "missing keys"),
    (lambda t: t.update({EXTRA: t[Q1]}), EXTRA, "unexpected keys"),
    (lambda t: t.update({PROJ: np.zeros((8, 32), np.float32)}), PROJ, "unexpected keys"),
    (lambda t: t.update({FC1: np.ascontiguousarray(t[FC1].T)}), FC1, "wrong shape"),
    (lambda t: t.update({POSITION_IDS: np.arange(17)[None, ::-1].copy()}), POSITION_IDS, "is not arange(17)"),
], ids=["missing", "unexpected", "projection_in_plain_model", "wrong_shape", "bad_position_ids"])
def test_converter_errors(tiny, tmp_path, edit, key, what):
    src = _write_variant(tiny, tmp_path, edit)
    with pytest.raises(ConversionError) as e:
        convert_clip(src, str(tmp_path / "out"))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and key in msg and what in msg


@pytest.mark.parametrize("prefix", ["", VISION])
def test_key_layouts(tiny, tmp_path, prefix):
    """Both prefixes, with the persistent `position_ids` buffer [1, N] int64 of transformers < 4.31."""
    _, _, reference = tiny["vit_h_like"]
    src = _write_variant(tiny, tmp_path, lambda t: t.update({prefix + POSITION_IDS: np.arange(17)[None]}), prefix)
    convert_clip(src, str(tmp_path / "out"))
    got, want = load_clip(str(tmp_path / "out"))[1], load_clip(str(reference))[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_converter_refuses_other_models(tiny, tmp_path):
    src = _write_variant(tiny, tmp_path, lambda t: None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConversionError, match="hidden_act 'relu': unsupported"):
        convert_clip(src, str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ConversionError, match="'CLIPTextModel' is not a CLIP vision tower"):
        convert_clip(src, str(tmp_path / "out"))


# ---------------------------------------------------------------- preprocessing == CLIPImageProcessor

def _natural_image(h, w, seed):
    """Smooth gradients, a few hard-edged shapes, texture and noise: a photo-like uint8 RGB image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * (x / max(w - 1, 1)), 255 * (y / max(h - 1, 1)), 128 + 100 * np.sin(x / 7 + y / 11)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(h, w) / 3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + rng.integers(2, h // 2 + 3), x0:x0 + rng.integers(2, w // 2 + 3)] = rng.uniform(0, 255, 3)
    img += (40 * np.sin(x * 1.3) * np.cos(y * 0.9))[..., None] + rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


SIZES = [(64, 96), (96, 64), (50, 50), (37, 251), (251, 37), (31, 45), (224, 224), (480, 832), (333, 500)]
PROCESSOR_CONFIGS = {
    "wan_golden": json.loads((GOLDEN / "image_processor" / "preprocessor_config.json").read_text()),
    "default_224": {},  # transformers' CLIPImageProcessor defaults (ViT-H/14, Wan2.1-I2V)
    "crop_pads": {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 40}, "resample": 2},
    "fixed_size": {"size": {"height": 40, "width": 30}, "crop_size": {"height": 32, "width": 32}},
}


def _hf_processor(config: dict):
    try:  # transformers >= 5: the PIL backend by name (CLIPImageProcessor falls back to it without torchvision)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL path
        cls = transformers.CLIPImageProcessor
    return cls(**{k: v for k, v in config.items() if k != "image_processor_type"})


@pytest.mark.parametrize("name", list(PROCESSOR_CONFIGS))
def test_preprocess_equals_transformers_bitwise(name):
    config = PROCESSOR_CONFIGS[name]
    hf, ours = _hf_processor(config), CLIPPreprocessConfig.from_transformers(config)
    images = [_natural_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    images.append(read_image(ROOT / "vapjax" / "assets" / "demo_image.png"))
    for image in images:
        want = hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess(image, ours)
        assert got.dtype == np.float32 and got.shape == want.shape, (image.shape, got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {image.shape}")


def test_preprocess_stacks_and_rejects_bad_input():
    cfg = CLIPPreprocessConfig.from_transformers(PROCESSOR_CONFIGS["wan_golden"])
    frames = np.stack([_natural_image(64, 96, s) for s in range(3)])[None]  # [1, 3, H, W, 3]
    got = preprocess(frames, cfg)
    assert got.shape == (1, 3, 32, 32, 3)
    np.testing.assert_array_equal(got[0, 2], preprocess(frames[0, 2], cfg))
    with pytest.raises(ValueError, match=r"expected RGB uint8 images \[..., H, W, 3\], got float32"):
        preprocess(frames.astype(np.float32), cfg)
    with pytest.raises(ValueError, match="not a CLIPImageProcessor"):
        CLIPPreprocessConfig.from_transformers({"image_processor_type": "SiglipImageProcessor"})


# ---------------------------------------------------------------- the Wan golden pipeline

def test_golden_image_embeds(tmp_path):
    """image / first selected reference frame -> CLIPImageProcessor -> hidden_states[-2], as the pipeline."""
    inputs, trace = load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "trace.safetensors")
    cfg_pre = CLIPPreprocessConfig.from_file(str(GOLDEN / "image_processor" / "preprocessor_config.json"))
    convert_clip(str(GOLDEN / "image_encoder"), str(tmp_path / "clip"))
    cfg, params = load_clip(str(tmp_path / "clip"))
    # frames_selection='evenly' starts at frame 0, so the reference image is ref_videos[0][0]
    for name, image in (("image", inputs["image"]), ("ref_first_frame", inputs["ref_videos"][0, 0])):
        pixels = preprocess(image[None], cfg_pre)
        np.testing.assert_array_equal(pixels, trace[f"clip_pixel_values.{name}"].transpose(0, 2, 3, 1), err_msg=name)
        err = rel_err(image_embeds(cfg, params, pixels), trace[f"clip_penultimate.{name}"])
        print(f"golden clip_penultimate.{name}: pixels bit-exact, embeds fp32 rel err {err:.2e}")
        assert err <= 1e-5, name


def load_clip(path, dtype=None):
    return checkpoint.load(path, "clip_vision", dtype=dtype)
