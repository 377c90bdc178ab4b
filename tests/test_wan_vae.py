"""Wan VAE: parity with diffusers' AutoencoderKLWan, the golden Wan pipeline's VAE calls, the converter.

The torch reference is the golden case's own tiny random VAE (base_dim 8, 16 latent channels, Wan2.1's level
layout), loaded by stock diffusers, so one conversion serves every test and proves config parsing on the
official config. Layouts: torch works in [B, C, F, H, W], we in [B, F, H, W, C].
"""
import contextlib
import json
import shutil
from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.core import check
from convert.errors import ConversionError
from vapjax import checkpoint
from convert.wan_vae import convert_vae, rules, target_shapes
from conftest import golden_dir, rel_err
from vapjax.models.wan_vae import AutoencoderKLWan, Posterior, Tiling, VAEConfig

import diffusers  # noqa: E402 (test-only references)
import torch  # noqa: E402

CASE = "wan_pipeline_tiny"
# 32-pixel (4-latent) tiles every 24 pixels: on 64x64 pixels / 8x8 latents a 3x3 grid of four tile shapes
# (4 and 2 latents a side), each blended with its already-blended upper and left neighbours.
TILING = Tiling(sample_height=32, sample_width=32, stride_height=24, stride_width=24)
# The same across only (one row of full-height tiles): half the tile shapes, half the compile time.
TILING_ACROSS = Tiling(sample_height=64, sample_width=32, stride_height=64, stride_width=24)


def to_ours(t):
    """torch [B, C, F, H, W] -> numpy [B, F, H, W, C]."""
    return np.asarray(t).transpose(0, 2, 3, 4, 1)


def to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 4, 1, 2, 3)))


_COMPILED = {}


def vae(cfg: VAEConfig, method: str, params, x, tiling: Tiling | None = None):
    """`AutoencoderKLWan(cfg, tiling).<method>(x)`, compiled once per configuration and input shape."""
    key = (cfg, method, tiling, tuple(x.shape))
    if key not in _COMPILED:
        model = AutoencoderKLWan(cfg, tiling=tiling)
        fn = jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))
        # LLVM optimisation is most of XLA's compile time for these tiny networks and none of their run time.
        _COMPILED[key] = fn.lower(params, jnp.asarray(x)).compile({"xla_backend_optimization_level": 0})
    return _COMPILED[key](params, jnp.asarray(x))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The golden case's VAE: diffusers reference, converted config and params, trace and inputs."""
    case = golden_dir() / CASE
    assert (case / "trace.safetensors").exists(), f"no golden case at {case} (set VAPJAX_GOLDEN_DIR)"
    ref = diffusers.AutoencoderKLWan.from_pretrained(case / "vae", torch_dtype=torch.float32).eval()
    dst = tmp_path_factory.mktemp("wan_vae")
    convert_vae(str(case / "vae"), str(dst))
    cfg, params = load_vae(str(dst))
    with open(case / "case.json") as f:
        frame_indices = json.load(f)["frame_indices"]
    return SimpleNamespace(ref=ref, src=case / "vae", cfg=cfg, params=params, converted=dst,
                           frame_indices=frame_indices, inputs=load_file(str(case / "inputs.safetensors")),
                           trace=load_file(str(case / "trace.safetensors")))


def golden_videos(g) -> dict[str, np.ndarray]:
    """The three videos the pipeline encodes, as [-1, 1] pixels [1, 9, 64, 96, 3]."""
    def pixels(u8):
        return u8.astype(np.float32) / 255 * 2 - 1

    ref_video = pixels(g.inputs["ref_videos"][:, g.frame_indices])
    zeros = np.zeros_like(ref_video[:, 1:])  # the condition video: a first frame, then zero pixels
    return {"image_condition": np.concatenate([pixels(g.inputs["image"])[None, None], zeros], axis=1),
            "ref_condition": np.concatenate([ref_video[:, :1], zeros], axis=1),
            "ref_video": ref_video}


def test_config_round_trip(golden):
    cfg = golden.cfg
    assert (cfg.base_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.z_dim) == (8, (1, 2, 2, 2), 1, 16)
    assert cfg.temporal_downsample == (False, True, True)
    assert (cfg.spatial_compression, cfg.temporal_compression, cfg.latent_frames(9)) == (8, 4, 3)
    assert cfg.latents_std == VAEConfig().latents_std and len(cfg.latents_mean) == 16
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert VAEConfig(dtype=jnp.bfloat16).dtype == "bfloat16"
    for bad, match in [({"is_residual": True}, "is_residual"), ({"attn_scales": [0.5]}, "attn_scales"),
                       ({"scale_factor_spatial": 16}, "scale_factor_spatial"),
                       ({"temperal_downsample": [True]}, "temporal_downsample"),
                       ({"z_dim": 4}, "latents_mean")]:
        with pytest.raises(ValueError, match=match):
            VAEConfig.from_diffusers(bad)


def test_posterior_helpers():
    mean = jnp.broadcast_to(jnp.arange(6.0).reshape(1, 1, 2, 3, 1), (4000, 1, 2, 3, 1))
    post = Posterior(mean, jnp.full_like(mean, np.log(4.0)))
    assert post.mode() is mean
    draws = post.sample(jax.random.key(0))
    np.testing.assert_array_equal(draws, post.sample(jax.random.key(0)))
    np.testing.assert_allclose(draws.mean(0), mean[0], atol=0.2)
    np.testing.assert_allclose(draws.std(0), 2.0, rtol=0.1)


@pytest.fixture(scope="module")
def encoded(golden):
    """One encode of the three golden videos and a random one (a batch mix-up in the chunking would show)."""
    videos = golden_videos(golden)
    videos["random"] = np.random.default_rng(0).uniform(-1, 1, (1, 9, 64, 96, 3)).astype(np.float32)
    posterior = vae(golden.cfg, "encode", golden.params, np.concatenate(list(videos.values())))
    return videos, posterior


@pytest.fixture(scope="module")
def decoded(golden):
    """One decode of the golden final latents and random ones, the second batch row."""
    z = np.concatenate([to_ours(golden.trace["vae_decode_input"]),
                        np.random.default_rng(1).standard_normal((1, 3, 8, 12, 16)).astype(np.float32)])
    return z, vae(golden.cfg, "decode", golden.params, z)


def test_encode_matches_diffusers(golden, encoded):
    # 9 frames -> chunks of 1, 4, 4 frames (the causal caches cross two chunk boundaries) -> 3 latent frames.
    videos, posterior = encoded
    with torch.no_grad():
        want = golden.ref.encode(to_torch(videos["random"])).latent_dist
    mean, logvar = posterior.mean[-1:], posterior.logvar[-1:]
    assert mean.shape == (1, 3, 8, 12, 16)
    err_mean, err_logvar = rel_err(mean, to_ours(want.mean)), rel_err(logvar, to_ours(want.logvar))
    # The sample: diffusers' draw, given our noise.
    rng = jax.random.key(7)
    noise = jax.random.normal(rng, mean.shape, mean.dtype)
    with mock.patch("diffusers.models.autoencoders.vae.randn_tensor", return_value=to_torch(noise)):
        want_sample = want.sample()
    err_sample = rel_err(Posterior(mean, logvar).sample(rng), to_ours(want_sample))
    print(f"encode rel err: mean {err_mean:.2e}, logvar {err_logvar:.2e}, sample {err_sample:.2e}")
    assert max(err_mean, err_logvar, err_sample) <= 1e-5


def test_decode_matches_diffusers(golden, decoded):
    # 3 latent frames decoded one at a time -> 1 + 4 + 4 = 9 frames.
    z, got = decoded
    with torch.no_grad():
        want = to_ours(golden.ref.decode(to_torch(z[-1:])).sample)
    err = rel_err(got[-1:], want)
    print(f"decode rel err: {err:.2e} (clamped: {np.mean(np.abs(want) == 1):.1%})")
    assert got.shape == (2, 9, 64, 96, 3) and err <= 1e-5


@contextlib.contextmanager
def tiled(ref, tiling: Tiling):
    ref.enable_tiling(tile_sample_min_height=tiling.sample_height, tile_sample_min_width=tiling.sample_width,
                      tile_sample_stride_height=tiling.stride_height, tile_sample_stride_width=tiling.stride_width)
    try:
        yield ref
    finally:
        ref.disable_tiling()


def test_tiled_decode(golden):
    # 2 latent frames: each tile carries its own causal caches through a time-doubling step.
    z = np.random.default_rng(2).standard_normal((1, 2, 8, 8, 16)).astype(np.float32)
    with torch.no_grad(), tiled(golden.ref, TILING_ACROSS) as ref:
        want = to_ours(ref.decode(to_torch(z)).sample)
    got = vae(golden.cfg, "decode", golden.params, z, TILING_ACROSS)
    err = rel_err(got, want)
    print(f"tiled decode rel err: {err:.2e}")
    assert got.shape == (1, 5, 64, 64, 3) and err <= 1e-5


def test_tiled_encode(golden):
    # The full 3x3 grid on one frame: time chunks within tiles are tested above, and cost compile time.
    video = np.random.default_rng(3).uniform(-1, 1, (1, 1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad(), tiled(golden.ref, TILING) as ref:
        want = ref.encode(to_torch(video)).latent_dist
    got = vae(golden.cfg, "encode", golden.params, video, TILING)
    err_mean, err_logvar = rel_err(got.mean, to_ours(want.mean)), rel_err(got.logvar, to_ours(want.logvar))
    print(f"tiled encode rel err: mean {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert got.mean.shape == (1, 1, 8, 8, 16) and max(err_mean, err_logvar) <= 1e-5


def test_golden_encode(golden, encoded):
    assert golden.frame_indices == [0, 1, 3, 4, 6, 7, 9, 10, 12]  # 'evenly': floor(linspace(0, 12, 9))
    videos, posterior = encoded
    for name, got in zip(videos, posterior.mode()):
        if name in ("image_condition", "ref_condition", "ref_video"):
            err = rel_err(got[None], to_ours(golden.trace[f"vae_encode_mode.{name}"]))
            print(f"golden encode {name}: rel err {err:.2e}")
            assert err <= 1e-5, name


def test_golden_decode(golden, decoded):
    got = decoded[1][:1] * 0.5 + 0.5  # the pipeline's frames are decoded * 0.5 + 0.5
    err = rel_err(got, golden.trace["frames"])
    print(f"golden decode: rel err {err:.2e}")
    assert err <= 1e-5


def test_golden_latent_normalisation(golden):
    # The pipeline's exact float32 arithmetic (multiply by 1/std, divide by it to undo): bit for bit.
    cfg, trace = golden.cfg, golden.trace
    np.testing.assert_array_equal(cfg.normalize(to_ours(trace["vae_encode_mode.ref_video"])),
                                  to_ours(trace["latents_mot_ref"]))
    np.testing.assert_array_equal(cfg.normalize(to_ours(trace["vae_encode_mode.image_condition"])),
                                  to_ours(trace["condition"])[..., 4:])  # after the 4 mask channels
    np.testing.assert_array_equal(cfg.denormalize(to_ours(trace["final_latents"])),
                                  to_ours(trace["vae_decode_input"]))


def test_bf16_close_to_fp32(golden):
    # bf16 compute and parameters against the fp32 reference output (norms and softmax stay fp32).
    cfg16, params16 = load_vae(str(golden.converted), dtype="bfloat16")
    assert cfg16.dtype == cfg16.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    frames = vae(cfg16, "decode", params16, to_ours(golden.trace["vae_decode_input"]))
    assert frames.dtype == jnp.bfloat16
    err = rel_err(frames.astype(jnp.float32) * 0.5 + 0.5, golden.trace["frames"])
    print(f"bf16 decode vs fp32 reference: rel err {err:.2e}")
    assert err <= 0.03  # bf16 rounding (measured 7.8e-3); a norm or softmax left in bf16 would be far above


def _meta_check(**config) -> int:
    """Our rules and parameter tree against diffusers' state dict on the meta device; returns the size."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**config)
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    check(shapes, rules(cfg), target_shapes(cfg))
    return sum(int(np.prod(s)) for s in shapes.values())


def test_rules_fit_full_size_layout():
    # Wan2.1's released architecture (base 96, 2 resnets per level), from shapes alone.
    count = _meta_check()
    print(f"Wan2.1 VAE parameters: {count:,}")
    assert count == 126_892_531


def test_rules_fit_other_layouts():
    # Widths that change between every level, a separate decoder width, 3 resnets per level, 4 latent channels.
    _meta_check(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 4, 3], num_res_blocks=3,
                temperal_downsample=[True, False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


@pytest.mark.parametrize("breakage, key", [
    ("missing", "decoder.up_blocks.1.upsamplers.0.time_conv.bias"),
    ("unexpected", "encoder.mid_block.attentions.1.proj.weight"),
    ("wrong_shape", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"),
])
def test_converter_errors_name_the_key(golden, tmp_path, breakage, key):
    tensors = load_file(str(golden.src / "diffusion_pytorch_model.safetensors"))
    if breakage == "missing":
        del tensors[key]
    elif breakage == "unexpected":
        tensors[key] = np.zeros((8, 8, 1, 1), np.float32)
    else:
        tensors[key] = tensors[key][:, :-1]
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(golden.src / "config.json", broken / "config.json")
    save_file(tensors, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError) as e:
        convert_vae(str(broken), str(tmp_path / "out"))
    message = str(e.value)
    assert key in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def test_converter_rejects_other_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "is_residual": True}))
    with pytest.raises(ConversionError, match="is_residual") as e:
        convert_vae(str(tmp_path), str(tmp_path / "out"))
    assert "\n" not in str(e.value)


def load_vae(path, dtype=None):
    return checkpoint.load(path, "wan_vae", dtype=dtype)
