"""Full bidirectional softmax attention, [B, S, N, D] → [B, S_q, N, D], with one entry point that picks
how to compute it:

- "cudnn": cuDNN flash attention (jax.nn.dot_product_attention) — on an NVIDIA GPU, bf16/fp16, head dim a
  multiple of 8 and ≤ 128 (≤ 256 from Hopper on).
- "blockwise": flash-style online softmax in plain JAX, a scan over key blocks that never holds the whole
  [S_q, S_k] score matrix — neither forward nor backward (custom VJP that recomputes scores per block from
  the saved log-sum-exp). Used where cuDNN cannot run and the sequence is long (CPU, fp32 on GPU, TPU).
- "xla": XLA's plain softmax(QKᵀ)V — short sequences, where the score matrix is small.

A video diffusion transformer attends over thousands of tokens (4 292 in a mid-size CogVideoX-VAP
forward, ~35 000 at full size), so materialising the scores is what makes plain XLA slow on CPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise")
KEY_BLOCK = 512          # keys per block of the blockwise path (CPU: best of 256–1024, see benchmarks/NOTES.md)
BLOCKWISE_MIN_KEYS = 1024  # below this the score matrix is small and plain XLA is as fast


def attention(q: Array, k: Array, v: Array, implementation: str | None = None, *,
              scale: float | None = None) -> Array:
    """softmax(scale · Q Kᵀ) V per head; q [B, S_q, N, D], k and v [B, S_k, N, D]; scale defaults to 1/√D.
    `implementation`: None picks one (see `choose`), or "xla" | "cudnn" | "blockwise"."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if implementation is None:
        implementation = choose(q.shape, k.shape, q.dtype, *_platform())
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, scale, KEY_BLOCK)
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    raise ValueError(f"attention implementation {implementation!r}: expected None, 'xla', 'cudnn' or 'blockwise'")


def choose(q_shape, k_shape, dtype, backend: str, compute_capability: str | None = None) -> str:
    """What `attention(implementation=None)` runs for these shapes and dtype on this backend
    (jax.default_backend(); compute_capability as a CUDA device reports it, e.g. "9.0")."""
    if backend == "gpu" and cudnn_supports(q_shape, k_shape, dtype, compute_capability):
        return "cudnn"
    return "blockwise" if k_shape[1] >= BLOCKWISE_MIN_KEYS else "xla"


def cudnn_supports(q_shape, k_shape, dtype, compute_capability: str | None) -> bool:
    """cuDNN flash attention's conditions (jax._src.cudnn.fused_attention_stablehlo) for our inputs:
    a CUDA device, fp16/bf16, equal head dims that are multiples of 8 up to 128 (256 on Hopper+)."""
    try:
        major = int(str(compute_capability).split(".")[0])
    except ValueError:                 # None, or a ROCm "gfx…" name: not CUDA
        return False
    head_dim = q_shape[-1]
    return (major >= 8 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim == k_shape[-1]
            and head_dim % 8 == 0 and head_dim <= (256 if major >= 9 else 128))


def _platform() -> tuple[str, str | None]:
    backend = jax.default_backend()
    return backend, getattr(jax.devices()[0], "compute_capability", None) if backend == "gpu" else None


# ----------------------------------------------------------------------------------------------
# Blockwise (flash-style) attention. Heads-major [B, N, S, D] inside; scores, running max, normaliser
# and the output accumulator in fp32; a key-block tail shorter than the block is one extra step.
# ----------------------------------------------------------------------------------------------

def blockwise_attention(q: Array, k: Array, v: Array, scale: float, block: int = KEY_BLOCK) -> Array:
    """Online-softmax attention over key blocks of `block`; same result as the plain path up to fp32
    rounding, memory O(S_q · D) beyond the inputs instead of O(S_q · S_k)."""
    return _blockwise(q, k, v, scale, block)


def _heads_major(x):
    return jnp.swapaxes(x, 1, 2)      # [B, S, N, D] <-> [B, N, S, D]


def _key_blocks(x, block):
    """[B, N, S, D] → full blocks [n, B, N, block, D] and the tail [B, N, S mod block, D] (or None)."""
    b, n, s, d = x.shape
    full = s // block * block
    blocks = x[:, :, :full].reshape(b, n, s // block, block, d).transpose(2, 0, 1, 3, 4)
    return blocks, (x[:, :, full:] if full < s else None)


def _scores(qs, kb):
    return jnp.einsum("bnqd,bnkd->bnqk", qs, kb, preferred_element_type=jnp.float32)


def _forward(q, k, v, scale, block):
    """Output [B, N, S_q, D] in q's dtype and the log-sum-exp of the scaled scores [B, N, S_q] (fp32)."""
    qs = _heads_major(q) * jnp.asarray(scale, q.dtype)
    kh, vh = _heads_major(k), _heads_major(v)

    def step(carry, kv):
        m, l, acc = carry
        kb, vb = kv
        s = _scores(qs, kb)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        l = l * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bnqk,bnkd->bnqd", p.astype(vb.dtype), vb,
                                                    preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    rows = qs.shape[:3]
    carry = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros(qs.shape, jnp.float32))
    (k_blocks, k_tail), (v_blocks, v_tail) = _key_blocks(kh, block), _key_blocks(vh, block)
    carry, _ = lax.scan(step, carry, (k_blocks, v_blocks))
    if k_tail is not None:
        carry, _ = step(carry, (k_tail, v_tail))
    m, l, acc = carry
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, scale, block):
    return _heads_major(_forward(q, k, v, scale, block)[0])


def _blockwise_fwd(q, k, v, scale, block):
    o, lse = _forward(q, k, v, scale, block)
    return _heads_major(o), (q, k, v, o, lse)


def _blockwise_bwd(scale, block, res, do):
    """Flash-attention backward: per key block, recompute P = exp(S − lse) and accumulate
    dQ = Σ dS K · scale; dK, dV of a block come out of that block alone."""
    q, k, v, o, lse = res
    do = _heads_major(do)
    qs = _heads_major(q) * jnp.asarray(scale, q.dtype)
    kh, vh = _heads_major(k), _heads_major(v)
    delta = jnp.einsum("bnqd,bnqd->bnq", do, o, preferred_element_type=jnp.float32)

    def step(dq, kv):
        kb, vb = kv
        p = jnp.exp(_scores(qs, kb) - lse[..., None])
        dv = jnp.einsum("bnqk,bnqd->bnkd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bnqd,bnkd->bnqk", do, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        dq = dq + jnp.einsum("bnqk,bnkd->bnqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bnqk,bnqd->bnkd", ds.astype(qs.dtype), qs, preferred_element_type=jnp.float32)
        return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

    (k_blocks, k_tail), (v_blocks, v_tail) = _key_blocks(kh, block), _key_blocks(vh, block)
    dq, (dk, dv) = lax.scan(step, jnp.zeros(qs.shape, jnp.float32), (k_blocks, v_blocks))
    b, n, _, d = kh.shape
    dk, dv = (x.transpose(1, 2, 0, 3, 4).reshape(b, n, -1, d) for x in (dk, dv))
    if k_tail is not None:
        dq, (dk_tail, dv_tail) = step(dq, (k_tail, v_tail))
        dk, dv = jnp.concatenate([dk, dk_tail], 2), jnp.concatenate([dv, dv_tail], 2)
    dq = (dq * scale).astype(q.dtype)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
