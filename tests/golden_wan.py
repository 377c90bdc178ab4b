"""Wan golden cases (official WanTransformer3DMOTModel on tiny random models): convert the case's
checkpoint with our converter, run our forward on the recorded inputs. Used by test_wan.py (and by
test_golden.py's per-kind dispatch)."""
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from conftest import golden_meta
from convert.wan import convert_transformer
from vapjax.models import wan

MODEL = "WanTransformer3DMOTModel"


def channels_last(x):
    """Official [B, C, F, H, W] -> our [B, F, H, W, C]."""
    return jnp.asarray(x).transpose(0, 2, 3, 4, 1)


def run_wan_case(case, dtype=jnp.float32):
    """Convert, run in `dtype` (weights and compute; fp32 islands stay fp32), return
    (cfg, meta, inputs, our output, expected) with both outputs float32 [B, F, H, W, C]."""
    meta = golden_meta(case)
    assert meta["model"] == MODEL and meta["num_mot_ref"] == 1, f"{case.name}: not a one-reference {MODEL} case"
    cfg, params = convert_transformer(str(case), dtype=dtype)   # records dtype as the compute dtype
    inp = load_file(case / "inputs.safetensors")
    x = lambda a: jnp.asarray(a, dtype)
    fwd = jax.jit(lambda p, *a: wan.WanTransformer(cfg).apply({"params": p}, *a))
    out = fwd(params, x(channels_last(inp["hidden_states"])), x(inp["encoder_hidden_states"]),
              x(inp["encoder_hidden_states_image"]), inp["timestep"],
              x(channels_last(inp["hidden_states_mot_ref"])), x(inp["encoder_hidden_states_mot_ref"]),
              x(inp["encoder_hidden_states_image_mot_ref"]),
              inp["timestep_mot_ref"].reshape(-1))       # official shape [1, 1]: one value for the batch
    assert out.dtype == dtype
    want = np.asarray(channels_last(load_file(case / "expected.safetensors")["sample"]))
    return cfg, meta, inp, np.asarray(out, np.float32), want
