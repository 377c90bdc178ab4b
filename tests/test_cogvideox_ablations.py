"""The paper's ablations as CogVideoX config switches (issue 11): structure, reference RoPE, expert-layer
presets, the reference's own timestep, and the official config flags through the converter.

Parity of A3/A4 with the official code is in test_golden.py (cog_ablation_cross_attn, cog_ablation_residual);
here: invariants of the variants without an official golden, and that every switch builds, runs forward
and backward and trains what it should. Exact equalities where the computation is the same sequence of
float ops; stated tolerances otherwise.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_cases, rel_err
from convert.cogvideox import convert_transformer
from convert.errors import ConversionError
from vapjax import families, training
from vapjax import tree as vtree
from vapjax.models import cogvideox
from vapjax.random_init import random_params

# Rotary only (no learned table), so that an empty (zero-length) reference caption is a valid input.
TINY = dict(num_heads=2, head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16, text_embed_dim=12,
            num_layers=3, sample_height=4, sample_width=6, sample_frames=5, max_text_seq_length=5,
            use_learned_pos=False, expert_layers=(0, 1))
B, F = 2, 2


def config(**kw):
    return cogvideox.CogVideoXConfig(**{**TINY, **kw})


def inputs(cfg, num_refs=1, seed=0):
    """Random target and references ([B, N·F, H, W, C] latents, [B, N·S, D] captions), t = (17, 901)."""
    rng = np.random.default_rng(seed)
    x = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
    hw = (cfg.sample_height, cfg.sample_width)
    return (x(B, F, *hw, cfg.in_channels), x(B, cfg.max_text_seq_length, cfg.text_embed_dim),
            jnp.array([17.0, 901.0]), x(B, num_refs * F, *hw, cfg.in_channels),
            x(B, num_refs * cfg.max_text_seq_length, cfg.text_embed_dim))


def params_for(cfg, seed=0):
    return random_params(cogvideox.param_shapes(cfg), seed)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, *args, **kw):  # one compile per config: faster than op-by-op here
    return cogvideox.CogVideoXTransformer(cfg).apply({"params": params}, *args, **kw)


def stock_forward(cfg, params, latents, text, t):
    """The stock CogVideoX (no expert, no reference) on the same backbone weights."""
    stock = cfg.with_options(structure="mot", lora_rank=0, expert_layers=())
    return forward(stock, {"backbone": params["backbone"]}, latents, text, t)


# ------------------------------------------------------------------------------------------------
# Config: presets, validation, the converter's flags

def test_expert_layer_presets_reproduce_the_official_lists():
    """At CogVideoX-5B's 42 layers, the presets are the official configs' block_idx_with_mot_ref."""
    official = {"all": list(range(41)), "odd": list(range(0, 41, 2)), "first_half": list(range(20)),
                "first_last": [0, 40], "odd_first_half": list(range(0, 21, 2))}
    for name, layers in official.items():
        assert cogvideox.expert_layer_preset(name, 42) == tuple(layers), name
        assert cogvideox.CogVideoXConfig(expert_layers=name).expert_layers == tuple(layers)
    assert cogvideox.expert_layer_preset([5, 1, 3], 42) == (1, 3, 5)
    assert set(official) == set(cogvideox.EXPERT_LAYER_PRESETS)
    with pytest.raises(ValueError, match="preset 'evens'") as e:
        cogvideox.CogVideoXConfig(expert_layers="evens")
    assert "\n" not in str(e.value)
    # Through to_dict / from_dict (training checkpoints) as the resolved layers.
    cfg = config(expert_layers="odd")
    assert cfg.expert_layers == (0,) and cogvideox.CogVideoXConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw,words", [
    (dict(structure="controlnet"), "structure='controlnet'"),
    (dict(ref_rope="shifted_h"), "ref_rope='shifted_h'"),
    (dict(structure="single_branch"), "has no expert: set expert_layers=()"),
    (dict(structure="single_branch_lora", expert_layers=()), "lora_rank=0"),
    (dict(lora_rank=4), "lora_rank=4 with structure='mot'"),
])
def test_bad_switches_are_one_line_errors(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        config(**kw)
    assert "\n" not in str(e.value)


def _golden_config(flag):
    case = next(c for c in golden_cases() if json.loads((c / "case.json").read_text()).get("ablation") == flag)
    return case, json.loads((case / "config.json").read_text())


def test_converter_maps_the_official_ablation_flags(tmp_path):
    """The two official flags select the structure; both at once (or a non-boolean) is refused in one line,
    by the config and by the converter."""
    for flag, structure in [("ablation_single_encoder", "unidirectional_cross_attn"),
                            ("ablation_residual_addition", "residual_addition")]:
        _, d = _golden_config(flag)
        assert d[flag] is True
        assert cogvideox.CogVideoXConfig.from_diffusers(d).structure == structure
        assert cogvideox.CogVideoXConfig.from_diffusers({**d, flag: False}).structure == "mot"
    for bad in (dict(ablation_single_encoder=True, ablation_residual_addition=True),
                dict(ablation_single_encoder="yes", ablation_residual_addition=False)):
        with pytest.raises(ValueError, match="expected at most one of them true"):
            cogvideox.CogVideoXConfig.from_diffusers({**d, **bad})
    case, d = _golden_config("ablation_single_encoder")
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "config.json").write_text(json.dumps({**d, "ablation_residual_addition": True}))
    (tmp_path / "both" / "diffusion_pytorch_model.safetensors").symlink_to(case / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match="ablation flags") as e:
        convert_transformer(str(tmp_path / "both"))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Reference RoPE

def test_reference_rope_positions():
    """identical: the target's positions per reference; shifted_tw: the shifted times, and the width
    moved one target width left (on the base grid: w − 3 for a 3-wide grid), heights unchanged."""
    gh, gw = 2, 3
    t0, h0, w0 = cogvideox.rope_positions(config(), F, gh, gw)
    t, h, w = cogvideox.rope_positions(config(ref_rope="identical"), F, gh, gw, num_refs=2)
    np.testing.assert_array_equal(t, [0, 1, 0, 1])
    np.testing.assert_array_equal(w, w0)
    ts, _, ws = cogvideox.rope_positions(config(), F, gh, gw, num_refs=2)
    np.testing.assert_array_equal(ts, [-4, -3, -2, -1])
    np.testing.assert_array_equal(ws, w0)
    t, h, w = cogvideox.rope_positions(config(ref_rope="shifted_tw"), F, gh, gw, num_refs=2)
    np.testing.assert_array_equal(t, ts)
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(w0, [0, 1, 2])
    np.testing.assert_array_equal(w, [-3, -2, -1])
    # Each mode changes the forward (the reference's positions reach the target through attention).
    cfg = config()
    p, x = params_for(cfg), inputs(cfg)
    outs = {m: forward(cfg.with_options(ref_rope=m), p, *x) for m in cogvideox.REF_ROPES}
    assert min(rel_err(outs[a], outs[b]) for a in outs for b in outs if a < b) > 1e-4


# ------------------------------------------------------------------------------------------------
# Single branch: invariants

def assert_same_computation(got, want):
    """Equal up to float32 rounding. The two sides are different XLA programs (a zero LoRA term, a
    concatenation of nothing), and whether they round identically is up to LLVM's instruction selection:
    bit for bit at -O3, a few ulps apart at the suite's -O1 (conftest.py). A semantic
    difference is ≥ 1e-3 (the checks beside each use)."""
    assert rel_err(got, want) <= 1e-6, rel_err(got, want)


def test_single_branch_empty_reference_is_the_stock_model():
    """A zero-length reference (no frames, no caption tokens) through the single-branch path gives the
    stock model's output: the concatenation, RoPE rows and the final slice add nothing."""
    for structure, rank in (("single_branch", 0), ("single_branch_lora", 4)):
        cfg = config(structure=structure, lora_rank=rank, expert_layers=())
        p = params_for(cfg)
        lat, txt, t, ref, ref_txt = inputs(cfg)
        out = forward(cfg, p, lat, txt, t, ref[:, :0], ref_txt[:, :0])
        assert_same_computation(out, stock_forward(cfg, p, lat, txt, t))
        assert rel_err(forward(cfg, p, lat, txt, t, ref, ref_txt), out) > 1e-3  # a real reference matters



def test_single_branch_drops_the_reference_caption():
    """The official single branch patch-embeds the reference with the target's caption and keeps only its
    video rows (stock cogvideox_transformer_3d.py:480-489): the reference's caption changes nothing."""
    cfg = config(structure="single_branch", expert_layers=())
    p = params_for(cfg)
    lat, txt, t, ref, ref_txt = inputs(cfg)
    np.testing.assert_array_equal(forward(cfg, p, lat, txt, t, ref, ref_txt),
                                  forward(cfg, p, lat, txt, t, ref, 3 * ref_txt + 1))


def test_single_branch_lora_init_is_peft_kaiming_uniform():
    """A ~ U(±1/√D) (PEFT's kaiming-uniform with a = √5, fan-in D), from the model's init and from the
    random weights a training run draws for a missing LoRA; B = 0."""
    cfg = config(structure="single_branch_lora", lora_rank=4, expert_layers=())
    for tree in (cogvideox.init_params(cfg, jax.random.PRNGKey(1))["lora"], params_for(cfg)["lora"]):
        a = np.concatenate([np.ravel(ab["lora_a"]) for ab in tree["blocks"].values()])
        bound = 1 / np.sqrt(cfg.dim)
        assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)
        assert all(np.all(ab["lora_b"] == 0) for ab in tree["blocks"].values())

def test_zero_lora_is_the_backbone():
    """LoRA with zero up-projections (its initialisation) is the backbone itself, with or without a reference;
    a nonzero LoRA changes the output."""
    cfg = config(structure="single_branch_lora", lora_rank=4, expert_layers=())
    p = params_for(cfg)
    assert all(np.all(ab["lora_b"] == 0) and np.any(ab["lora_a"] != 0) for ab in p["lora"]["blocks"].values())
    init = cogvideox.init_params(cfg, jax.random.PRNGKey(1))["lora"]
    assert all(np.all(ab["lora_b"] == 0) for ab in init["blocks"].values())
    x = inputs(cfg)
    no_lora = cfg.with_options(structure="single_branch", lora_rank=0)
    assert_same_computation(forward(cfg, p, *x), forward(no_lora, {"backbone": p["backbone"]}, *x))
    assert_same_computation(forward(cfg, p, *x[:3]), stock_forward(cfg, p, *x[:3]))
    moved = jax.tree.map(lambda a: a + 0.1, p)
    assert rel_err(forward(cfg, {**p, "lora": moved["lora"]}, *x), forward(cfg, p, *x)) > 1e-3


# ------------------------------------------------------------------------------------------------
# Every switch: forward, backward, what trains

# The partition each structure trains (minus the position-table buffer).
TRAINS = {"mot": "expert", "unidirectional_cross_attn": "expert", "residual_addition": "expert",
          "single_branch": "backbone", "single_branch_lora": "lora"}
# Each structure once; the other switches ride along (RoPE modes, presets, the reference timestep,
# the learned position table, both remat policies), so every one runs forward and backward.
VARIANTS = [
    dict(structure="mot", ref_rope="shifted_tw", expert_layers="first_last", ref_t=300.0),
    dict(structure="unidirectional_cross_attn", ref_rope="identical", ref_t=0.0, use_learned_pos=True),
    dict(structure="residual_addition", remat="full"),
    dict(structure="single_branch", expert_layers=()),
    dict(structure="single_branch_lora", lora_rank=4, expert_layers=(), remat="dots"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_every_switch_runs_forward_and_backward_and_trains_its_partition(variant):
    """The variant's trainable parameters (vapjax.training.split_params with the family's structure
    regex) are exactly its partition minus the position-table buffer, and every one gets a nonzero
    gradient (LoRA's up-projections moved off zero first: at zero, its down-projections have none)."""
    variant = dict(variant)
    ref_t = variant.pop("ref_t", None)
    cfg = config(**variant)
    p = params_for(cfg)
    if "lora" in p:
        p["lora"] = jax.tree.map(lambda a: a + 0.1, p["lora"])
    lat, txt, t, ref, ref_txt = inputs(cfg, num_refs=1 if cfg.structure == "residual_addition" else 2)
    trainable, frozen = training.split_params(p, families.get("cogvideox").unfreeze(cfg))
    part = TRAINS[cfg.structure]
    assert set(vtree.flatten(trainable)) == {k for k in vtree.flatten(p) if k[0] == part and k[-1] != "pos_embedding"}

    def loss(tr):
        out = forward(cfg, vtree.merge(tr, frozen), lat, txt, t, ref, ref_txt,
                      **({} if ref_t is None else {"ref_t": jnp.full((B,), ref_t)}))
        return jnp.mean(jnp.square(out))

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert np.isfinite(value)
    zero = [vtree.path_str(k) for k, g in vtree.flatten(grads).items() if not np.any(g)]
    assert not zero, zero


def test_reference_timestep():
    """ref_t = t is the default path exactly; another ref_t changes the output (only through the
    expert's adaLN); ref_t needs an expert."""
    cfg = config()
    p, x = params_for(cfg), inputs(cfg)
    out = forward(cfg, p, *x)
    np.testing.assert_array_equal(forward(cfg, p, *x, ref_t=x[2]), out)
    assert rel_err(forward(cfg, p, *x, ref_t=jnp.zeros(B)), out) > 1e-4
    sb = config(structure="single_branch", expert_layers=())
    with pytest.raises(ValueError, match="ref_t drives the expert's adaLN"):
        forward(sb, params_for(sb), *x, ref_t=jnp.zeros(B))



def test_reference_head():
    """ref_head (official reference_independent): the expert's own output head predicts the references
    ([B, N·F, H, W, C]) beside the unchanged target prediction; it needs the head and a reference."""
    cfg = config(ref_head=True)
    p, x = params_for(cfg), inputs(cfg, num_refs=2)
    assert set(p["expert"]["head"]) == set(p["backbone"]["head"])
    model = cogvideox.CogVideoXTransformer(cfg)
    out, ref = jax.jit(lambda p_: model.apply({"params": p_}, *x, ref_output=True))(p)
    np.testing.assert_array_equal(out, forward(cfg, p, *x))
    assert ref.shape == x[3].shape[:-1] + (cfg.out_channels,) and np.all(np.isfinite(ref))
    plain = config()
    with pytest.raises(ValueError, match="ref_output needs the expert's output head"):
        cogvideox.CogVideoXTransformer(plain).apply({"params": params_for(plain)}, *x, ref_output=True)

def test_residual_addition_needs_one_reference_of_the_target_size():
    cfg = config(structure="residual_addition")
    with pytest.raises(ValueError, match="needs one reference of the target's size, got 2") as e:
        forward(cfg, params_for(cfg), *inputs(cfg, num_refs=2))
    assert "\n" not in str(e.value)
