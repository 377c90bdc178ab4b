"""vapjax.attention: every implementation agrees with the plain XLA softmax(QKᵀ)V, forward and gradients,
the automatic choice picks what each backend/dtype/shape allows, and the blockwise path keeps its promise
of never holding the whole score matrix. Tolerance: fp32 relative error ≤ 1e-6 (measured ≤ 5e-7; a wrong
rescale of the running sum, a dropped tail block or a missing scale is ≥ 1e-2)."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_cases, rel_err
from vapjax import attention as attn
from vapjax.attention import Tiling, attention, blockwise_attention, choose
from vapjax.models import cogvideox

# (batch, S_q, S_k, heads, head dim, tiling): key and query tails shorter than a block, exact multiples,
# S_k below one key block, one query block for all, cross-attention both ways, heads mapped and vmapped.
SHAPES = [(2, 37, 37, 3, 16, Tiling(16, 16)), (1, 64, 64, 2, 8, Tiling(16, 16, heads_at_once=True)),
          (2, 29, 53, 2, 16, Tiling(8, 16)), (3, 70, 20, 2, 8, Tiling(100, 32, heads_at_once=True)),
          (2, 40, 5, 1, 8, Tiling(16, 16))]


def _qkv(b, sq, sk, n, d, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(s), dtype) for s in ((b, sq, n, d), (b, sk, n, d), (b, sk, n, d)))


def _plain(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _value_and_grads(f, q, k, v, w):
    """f(q, k, v) and the gradients of ⟨f(q, k, v), w⟩ (w a generic cotangent)."""
    out, pull = jax.vjp(f, q, k, v)
    return out, pull(w)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Sq{}_Sk{}_N{}_D{}_{}".format(*s[:5], s[5].key_block))
def test_blockwise_matches_plain(shape):
    *dims, tiling = shape
    q, k, v = _qkv(*dims)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    scale = 1 / np.sqrt(dims[-1])
    (out, grads), (want, want_grads) = jax.jit(lambda *x: (
        _value_and_grads(lambda *y: blockwise_attention(*y, scale, tiling), *x),
        _value_and_grads(_plain, *x)))(q, k, v, w)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) <= 1e-6
    for name, got, ref in zip("qkv", grads, want_grads):
        assert rel_err(got, ref) <= 1e-6, name


def test_entry_point_paths_and_scale():
    q, k, v = _qkv(2, 40, 600, 2, 8)         # S_k ≥ 512: auto is blockwise on CPU, with a key tail
    outs = jax.jit(lambda q, k, v: [_plain(q, k, v), *(attention(q, k, v, i) for i in (None, "xla", "blockwise")),
                                    attention(q, k, v, "blockwise", scale=0.3),
                                    jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")])(q, k, v)
    for impl, out in zip((None, "xla", "blockwise", "scale=0.3"), outs[1:5]):
        assert rel_err(out, outs[0] if impl != "scale=0.3" else outs[5]) <= 1e-6, impl
    with pytest.raises(ValueError, match="expected None, 'xla', 'cudnn' or 'blockwise'"):
        attention(q, k, v, "flash")


def test_blockwise_bf16_accumulates_in_fp32():
    q, k, v = _qkv(2, 37, 53, 2, 16, dtype=jnp.bfloat16)
    out, want = jax.jit(lambda *x: (blockwise_attention(*x, 0.25, Tiling(16, 16)),
                                    _plain(*(a.astype(jnp.float32) for a in x))))(q, k, v)
    assert out.dtype == jnp.bfloat16
    # bf16 inputs, fp32 softmax statistics: bf16-rounding-level error (≈ 4e-3), not the ~1e-1 of a bf16 running sum
    assert rel_err(out, want) <= 1e-2


def test_blockwise_backward_never_holds_the_score_matrix():
    """Differentiating a plain scan over key blocks would store every block's probabilities — the
    whole [S_q, S_k] matrix again; the custom VJP keeps only the output and the log-sum-exp."""
    b, s, n, d = 1, 512, 2, 8
    q, k, v = _qkv(b, s, s, n, d)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: blockwise_attention(q, k, v, 0.3, Tiling(128, 64)).sum(), (0, 1, 2)))(q, k, v)

    def sizes(jx):
        for eqn in jx.eqns:
            yield from (int(np.prod(x.aval.shape)) for x in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) < b * n * s * s


def test_gradient_under_remat_and_jit():
    q, k, v = _qkv(2, 33, 33, 2, 8)
    f = lambda impl: jax.jit(jax.grad(jax.checkpoint(lambda q: attention(q, k, v, impl).sum() ** 2)))
    assert rel_err(f("blockwise")(q), f("xla")(q)) <= 1e-6


# (backend, compute capability, dtype, head dim, S_k) -> what auto picks
CHOICES = [
    ("gpu", "9.0", jnp.bfloat16, 64, 35000, "cudnn"),       # CogVideoX-VAP at full size on an H100/H200
    ("gpu", "8.0", jnp.float16, 128, 100, "cudnn"),         # cuDNN at any length
    ("gpu", "9.0", jnp.float32, 64, 35000, "blockwise"),    # cuDNN flash has no fp32
    ("gpu", "9.0", jnp.float32, 64, 100, "xla"),
    ("gpu", "9.0", jnp.bfloat16, 60, 35000, "blockwise"),   # head dim not a multiple of 8
    ("gpu", "8.0", jnp.bfloat16, 192, 35000, "blockwise"),  # > 128 before Hopper
    ("gpu", "9.0", jnp.bfloat16, 192, 35000, "cudnn"),      # ≤ 256 from Hopper on
    ("gpu", "7.0", jnp.bfloat16, 64, 35000, "blockwise"),   # pre-Ampere: no flash kernel
    ("gpu", "gfx90a", jnp.bfloat16, 64, 35000, "blockwise"),  # ROCm: no cuDNN
    ("cpu", None, jnp.bfloat16, 64, 35000, "blockwise"),
    ("gpu", "9.0", jnp.float32, 64, 4095, "xla"),
    ("cpu", None, jnp.float32, 64, 512, "blockwise"),
    ("cpu", None, jnp.float32, 64, 511, "xla"),
    ("tpu", None, jnp.bfloat16, 128, 35000, "blockwise"),
]


@pytest.mark.parametrize("backend,cc,dtype,d,sk,want", CHOICES)
def test_auto_choice(backend, cc, dtype, d, sk, want):
    assert choose((2, sk, 48, d), (2, sk, 48, d), dtype, backend, cc) == want


def test_auto_on_this_machine():
    """What `attention(None)` runs here follows this device, read independently of `_platform`: cuDNN
    exactly on a CUDA GPU of compute capability >= 8 (bf16, head dim 8), else plain XLA for 8 keys; and
    the choice runs and agrees with plain attention."""
    q, k, v = _qkv(1, 8, 8, 1, 8, dtype=jnp.bfloat16)
    device = jax.devices()[0]
    cc = str(getattr(device, "compute_capability", "") or "")
    cuda_ampere = device.platform == "gpu" and cc[:1].isdigit() and int(cc.split(".")[0]) >= 8
    want = "cudnn" if cuda_ampere else "xla"
    assert attn.resolve(None, q.shape, k.shape, q.dtype) == want, (device.platform, cc)
    np.testing.assert_allclose(np.float32(attn.attention(q, k, v)), np.float32(_plain(q, k, v)), atol=3e-2)


def test_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attention='flash'"):
        cogvideox.CogVideoXConfig(attention="flash")


CASE = [c for c in golden_cases() if c.name == "cog_mot_1ref"]


def test_golden_forward_blockwise(monkeypatch):
    """The official cog_mot_1ref forward with every attention call blockwise, in tiles of 16 × 16 (several
    blocks and tails both ways). fp32 relative error ≤ 1e-5, as test_golden."""
    from test_golden import run_transformer_case  # noqa: PLC0415
    assert CASE, "golden case cog_mot_1ref not found (set VAPJAX_GOLDEN_DIR)"
    monkeypatch.setitem(attn.TILINGS, "cpu", Tiling(16, 16))
    *_, out, want = run_transformer_case(CASE[0], attention="blockwise")
    assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("dtype,want", [("float32", "blockwise"), ("bfloat16", "cudnn")])
def test_wan_config_leaves_attention_to_the_automatic_choice(dtype, want):
    """configs/wan_vap.py once forced "cudnn", which cuDNN's flash kernel cannot run in fp32
    (--config.dtype=float32 failed to compile on a GPU). Its attention is now "" (auto): at full size
    (40 heads of 128 over 2 × 20 280 joint tokens) on an H100, cuDNN in bf16 and blockwise in fp32."""
    from configs import wan_vap  # noqa: PLC0415
    c = wan_vap.get_config()
    assert c.attention == ""
    shape = (2, 2 * 20280, 40, 128)
    assert attn.resolve(c.attention or None, shape, shape, jnp.dtype(dtype)) == choose(
        shape, shape, jnp.dtype(dtype), *attn._platform())
    assert choose(shape, shape, jnp.dtype(dtype), "gpu", "9.0") == want
