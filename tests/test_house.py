"""House rules that span modules: the runtime never imports the converter, one checkpoint loader and
dtype contract for every model kind, model families as registry entries, sharding rules that name every
parameter of every full-size model, and activation constraints that change placement, not results."""
import ast
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from configs import cog_vap_tiny
from conftest import ROOT, with_xla_flags
from vapjax import checkpoint, families, sharding
from vapjax.models import clip, cogvideox, cogvideox_vae, t5, wan, wan_vae
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP
from vapjax.pipelines.wan_vap import WanVAP
from vapjax.random_init import random_params
from vapjax.tree import flatten


def test_runtime_never_imports_convert():
    offenders = []
    for path in sorted((ROOT / "vapjax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "convert"]
    assert not offenders, f"vapjax/ imports convert/: {offenders}"


# ---------------------------------------------------------------------------------------------
# Checkpoints: one loader, one dtype contract
# ---------------------------------------------------------------------------------------------

def tiny_configs() -> dict:
    m = cog_vap_tiny.get_config().model
    return {"cogvideox_transformer": cogvideox.CogVideoXConfig(**m.transformer.to_dict()),
            "cogvideox_vae": cogvideox_vae.VAEConfig(**m.vae.to_dict()),
            "t5_encoder": t5.T5Config(**m.text_encoder.to_dict()),
            "wan_vae": wan_vae.VAEConfig(base_dim=8, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,)),
            "clip_vision": clip.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                                 patch_size=4, image_size=16),
            "wan_transformer": wan.WanConfig(num_heads=2, head_dim=12, in_channels=12, out_channels=4, text_dim=16,
                                             image_dim=20, freq_dim=8, ffn_dim=40, num_layers=2, expert_layers=(0,))}


INIT = {"cogvideox_transformer": cogvideox.init_params, "cogvideox_vae": cogvideox_vae.init_params,
        "t5_encoder": t5.init_params, "wan_vae": wan_vae.init_params, "clip_vision": clip.init_params,
        "wan_transformer": wan.init_params}


@pytest.mark.parametrize("kind", list(checkpoint.KINDS))
def test_every_kind_loads_with_one_dtype_contract(tmp_path, kind):
    cfg = tiny_configs()[kind]
    params = random_params(jax.eval_shape(lambda: INIT[kind](cfg, jax.random.key(0))), 0)
    checkpoint.save(str(tmp_path), params, cfg)
    assert checkpoint.read_kind(str(tmp_path)) == kind

    got_cfg, got = checkpoint.load(str(tmp_path), kind)  # as stored
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)

    cfg16, p16 = checkpoint.load(str(tmp_path), kind, dtype=jnp.bfloat16)  # weights AND compute dtype
    assert cfg16 == type(cfg).from_dict({**cfg.to_dict(), "dtype": "bfloat16", "param_dtype": "bfloat16"})
    assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), p16, params)


def test_checkpoint_errors_are_one_line(tmp_path):
    cfg = tiny_configs()["t5_encoder"]
    checkpoint.save(str(tmp_path), random_params(jax.eval_shape(lambda: t5.init_params(cfg, jax.random.key(0))), 0), cfg)
    for call, message in [
        (lambda: checkpoint.load(str(tmp_path), "cogvideox_vae"), "holds a 't5_encoder', expected a 'cogvideox_vae'"),
        (lambda: checkpoint.load(str(tmp_path), "hunyuan_transformer"), "unknown checkpoint kind 'hunyuan_transformer'"),
        (lambda: checkpoint.load(str(tmp_path), "t5_encoder", attention="xla"), "cannot apply ['attention']"),
        (lambda: checkpoint.load(str(tmp_path / "nope"), "t5_encoder"), "no such checkpoint folder"),
        (lambda: checkpoint.save(str(tmp_path / "x"), {}, object()), "no checkpoint kind for a object"),
    ]:
        with pytest.raises(checkpoint.CheckpointError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

def test_families_registry(tmp_path):
    for name, pipeline, kind in [("cogvideox", CogVideoXVAP, "cogvideox_transformer"), ("wan", WanVAP, "wan_transformer")]:
        fam = families.get(name)
        assert fam.pipeline is pipeline and fam.transformer_kind == kind and kind in checkpoint.KINDS
    with pytest.raises(ValueError, match="unknown model family 'hunyuan' \\(known: cogvideox, wan\\)"):
        families.get("hunyuan")
    for name, family in families.FAMILIES.items():
        kind = family.transformer_kind
        cfg = tiny_configs()[kind]
        assert type(cfg) is checkpoint.KINDS[kind]
        checkpoint.save(str(tmp_path / name / "transformer"), random_params(family.param_shapes(cfg), 0), cfg)
        (tmp_path / name / "pipeline.json").write_text("{}")
        assert families.of_checkpoint(str(tmp_path / name)) == families.of_checkpoint(
            str(tmp_path / name / "transformer")) == name


def test_train_py_never_names_a_family():
    """train.py takes everything family-specific from the registry: no family name appears in it."""
    tree = ast.parse((ROOT / "train.py").read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    named = sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
                    and n.value in families.FAMILIES})
    assert not named, f"train.py names families {named}: branch through vapjax.families instead"


# ---------------------------------------------------------------------------------------------
# Sharding: every parameter of every full-size model has a rule
# ---------------------------------------------------------------------------------------------

def full_size_trees() -> dict:
    key = jax.random.key(0)
    return {
        "CogVideoX-5B-I2V + VAP": cogvideox.param_shapes(cogvideox.CogVideoXConfig()),
        "CogVideoX-5B-I2V single-branch LoRA r64": cogvideox.param_shapes(cogvideox.CogVideoXConfig(
            structure="single_branch_lora", lora_rank=64, expert_layers=())),
        "CogVideoX VAE": jax.eval_shape(lambda: cogvideox_vae.init_params(cogvideox_vae.VAEConfig(), key)),
        "T5-XXL encoder": jax.eval_shape(lambda: t5.init_params(t5.T5Config(), key)),
        "UMT5-XXL encoder": jax.eval_shape(lambda: t5.init_params(t5.T5Config(per_layer_position_bias=True), key)),
        "Wan2.1-I2V-14B + VAP d10": wan.param_shapes(wan.WanConfig()),
        "Wan2.1-I2V-14B + VAP d20": wan.param_shapes(wan.WanConfig(expert_layers=wan.EXPERT_PRESETS["d20"])),
    }


# Per-device share of the weights on a (data 1, fsdp 8, tensor 4) mesh: matrices split 32 ways; the
# adaLN modulations (14% of the transformer) and the VAE convolutions split only over fsdp (1/8), a LoRA's
# factors over one of fsdp or tensor (measured 0.0477 at rank 64).
# Replicating a large parameter by mistake (e.g. a 54.6 M position table) raises the share past these.
SHARE = {"CogVideoX-5B-I2V + VAP": 0.047, "CogVideoX-5B-I2V single-branch LoRA r64": 0.048, "CogVideoX VAE": 0.126, "T5-XXL encoder": 0.032, "UMT5-XXL encoder": 0.032,
         "Wan2.1-I2V-14B + VAP d10": 0.034, "Wan2.1-I2V-14B + VAP d20": 0.034}


def test_sharding_rules_cover_every_full_size_parameter():
    """Each parameter of each full-size model matches a rule of its rank, and large ones are split."""
    mesh = AbstractMesh((1, 8, 4), sharding.MESH_AXES)
    for name, tree in full_size_trees().items():
        specs = flatten(sharding.param_specs(tree, mesh))
        total = per_device = 0
        for path, a in flatten(tree).items():
            split = int(np.prod([mesh.shape[n] for s in specs[path] if s for n in ((s,) if isinstance(s, str) else s)]))
            total += a.size
            per_device += a.size / split
        print(f"{name}: {total / 1e9:.3f} B parameters, per device {per_device / total:.4f} of them on 8x4")
        assert per_device / total <= SHARE[name], name


def test_unmatched_parameter_is_an_error():
    mesh = AbstractMesh((1, 2, 1), sharding.MESH_AXES)
    tree = {"backbone": {"new_module": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}}
    with pytest.raises(sharding.ShardingError, match="no sharding rule for parameter backbone/new_module/kernel"):
        sharding.param_specs(tree, mesh)
    with pytest.raises(sharding.ShardingError, match="rank 3"):  # a rule of the wrong rank is no match either
        sharding.param_specs({"final_norm": {"scale": jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)}}, mesh)
    with pytest.raises(sharding.ShardingError, match="'activation_typo' is not in the rules"):
        sharding.spec(("activation_typo",), (4,), mesh)


def test_constraints_are_identity_without_rules():
    x = jnp.ones((2, 4))
    assert sharding.constrain(x, ("activation_batch", "activation_embed")) is x
    cfg = tiny_configs()["cogvideox_transformer"]
    lowered = jax.jit(lambda p, *x: cogvideox.CogVideoXTransformer(cfg).apply({"params": p}, *x)).lower(
        cogvideox.param_shapes(cfg), *cogvideox.dummy_inputs(cfg))
    assert "sharding_constraint" not in lowered.as_text()


ACTIVATION_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from vapjax import sharding
    from vapjax.models import cogvideox
    from vapjax.random_init import random_params

    cfg = cogvideox.CogVideoXConfig(num_heads=4, head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
                                    text_embed_dim=16, num_layers=2, sample_height=8, sample_width=8,
                                    sample_frames=5, max_text_seq_length=8, expert_layers=(0,))  # joint + plain layer
    params = random_params(cogvideox.param_shapes(cfg), 0)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(x.shape).astype(np.float32) for x in cogvideox.dummy_inputs(cfg, batch=2)]
    inputs[2] = np.array([17.0, 901.0], np.float32)
    # A fresh function per run: rules are read when a function is traced, and jit caches traces.
    forward = lambda: lambda p, *x: cogvideox.CogVideoXTransformer(cfg).apply({"params": p}, *x)
    want = np.asarray(jax.jit(forward())(params, *inputs))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    out = {"devices": jax.device_count()}
    for name, rules in {"heads": sharding.RULES,
                        "sequence": {**sharding.RULES, "activation_length": "tensor", "activation_heads": None}}.items():
        with sharding.use_rules(mesh, rules):
            lowered = jax.jit(forward()).lower(params, *inputs)
            hlo, got = lowered.as_text(), np.asarray(lowered.compile()(params, *inputs))
        out[name] = {"rel_err": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                     "constraints": [line.split("<@", 1)[1].split(">", 1)[0]
                                     for line in hlo.splitlines() if "sdy.sharding_constraint" in line]}
    print("RESULT" + json.dumps(out))
""")


def test_activation_constraints_on_eight_devices():
    """Under an 8-device CPU mesh (fsdp 2 × tensor 4): q/k/v of the joint sequence are split by heads
    (default rules) or by tokens (sequence rules), and the output equals the unconstrained forward."""
    env = {**os.environ, "XLA_FLAGS": with_xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", ACTIVATION_WORKER], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    assert out["devices"] == 8
    heads, tokens = 'mesh, [{"fsdp"}, {}, {"tensor"}, {}]', 'mesh, [{"fsdp"}, {"tensor"}, {}, {}]'
    hidden, hidden_seq = 'mesh, [{"fsdp"}, {}, {}]', 'mesh, [{"fsdp"}, {"tensor"}, {}]'
    for name, attn, states in [("heads", heads, hidden), ("sequence", tokens, hidden_seq)]:
        r = out[name]
        print(f"{name}: {len(r['constraints'])} constraints, rel err vs unsharded {r['rel_err']:.1e}")
        assert attn in r["constraints"] and states in r["constraints"], (name, sorted(set(r["constraints"])))
        # Sharded matmuls sum in another order: float32 round-off only (a mis-split would be O(1)).
        assert r["rel_err"] <= 1e-5
