"""Full bidirectional softmax attention, [B, S, N, D] → [B, S_q, N, D], with one entry point that picks
how to compute it:

- "cudnn": cuDNN flash attention (jax.nn.dot_product_attention) — on an NVIDIA GPU (Ampere or later),
  bf16/fp16, head dim a multiple of 8 and ≤ 128 (≤ 256 from Hopper on).
- "blockwise": flash-style online softmax in plain JAX over [query block, key block] score tiles; the
  whole [S_q, S_k] score matrix never exists, forward or backward (a custom VJP recomputes each tile from
  the saved log-sum-exp). Used where cuDNN cannot run and the sequence is long (CPU, fp32 on GPU, TPU).
- "xla": XLA's plain softmax(QKᵀ)V — short sequences, where the score matrix is small.

A video diffusion transformer attends over thousands of tokens (4 292 in a mid-size CogVideoX-VAP
forward, ~35 000 at full size): materialising the scores is what makes the plain path slow on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise")
# From this many keys on, auto picks blockwise over plain XLA. CPU: measured crossover (at 256 keys the two
# are equal forward and XLA is faster backward; at 512 blockwise is 2.3× faster forward, 1.1× backward).
# Accelerators (fp32 or no cuDNN only): not measured; there it is about memory (48 heads × 4096² fp32
# scores per sample are 3 GiB).
BLOCKWISE_MIN_KEYS = {"cpu": 512, "accelerator": 4096}


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the blockwise path walks the score matrix. On CPU one head's [512, 512] fp32 tile (1 MiB) stays
    in cache, and going head by head beats batching the heads (measured, benchmarks/NOTES.md); an
    accelerator wants all heads in one batched op and large query blocks instead."""
    query_block: int = 512
    key_block: int = 512
    heads_at_once: bool = False


TILINGS = {"cpu": Tiling(), "accelerator": Tiling(query_block=4096, key_block=512, heads_at_once=True)}


def attention(q: Array, k: Array, v: Array, implementation: str | None = None, *,
              scale: float | None = None) -> Array:
    """softmax(scale · Q Kᵀ) V per head; q [B, S_q, N, D], k and v [B, S_k, N, D]; scale defaults to 1/√D.
    `implementation`: None picks one (see `choose`), or "xla" | "cudnn" | "blockwise"."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    implementation = resolve(implementation, q.shape, k.shape, q.dtype)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, scale, TILINGS["cpu" if jax.default_backend() == "cpu" else "accelerator"])
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def resolve(implementation: str | None, q_shape, k_shape, dtype) -> str:
    """The implementation `attention` runs here: `implementation` itself, or for None the automatic choice."""
    if implementation is None:
        return choose(q_shape, k_shape, dtype, *_platform())
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected None, 'xla', 'cudnn' or 'blockwise'")
    return implementation


def choose(q_shape, k_shape, dtype, backend: str, compute_capability: str | None = None) -> str:
    """What `attention(implementation=None)` runs for these shapes and dtype on this backend
    (jax.default_backend(); compute_capability as a CUDA device reports it, e.g. "9.0")."""
    if backend == "gpu" and cudnn_supports(q_shape, k_shape, dtype, compute_capability):
        return "cudnn"
    return "blockwise" if k_shape[1] >= BLOCKWISE_MIN_KEYS["cpu" if backend == "cpu" else "accelerator"] else "xla"


def cudnn_supports(q_shape, k_shape, dtype, compute_capability: str | None) -> bool:
    """cuDNN flash attention's conditions (jax._src.cudnn.fused_attention_stablehlo) for our inputs:
    a CUDA device of compute capability ≥ 8.0, fp16/bf16, equal head dims, multiples of 8 up to 128
    (256 from Hopper, 9.0, on)."""
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
# Blockwise (flash-style) attention, per head on [S, D] (heads mapped or vmapped). Queries come
# pre-scaled; scores, running max, normaliser, accumulators and the log-sum-exp are fp32. Query blocks
# are zero-padded (padded rows are computed and dropped, their cotangent is zero); a key tail shorter
# than a block is one extra step, so no masking is ever needed.
# ----------------------------------------------------------------------------------------------

def blockwise_attention(q: Array, k: Array, v: Array, scale: float, tiling: Tiling = Tiling()) -> Array:
    """Online-softmax attention; the plain result up to fp32 rounding, with memory O(S · D) beyond the
    inputs (plus one tile per head in flight) instead of O(S_q · S_k)."""
    return _blockwise(q, k, v, scale, tiling)


def _heads(x):
    """[B, S, N, D] → [B·N, S, D]."""
    b, s, n, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * n, s, d)


def _unheads(x, like):
    b, _, n, d = like.shape
    return jnp.swapaxes(x.reshape(b, n, -1, d), 1, 2)


def _over_heads(f, tiling, *xs):
    return jax.vmap(f)(*xs) if tiling.heads_at_once else lax.map(lambda a: f(*a), xs)


def _query_blocks(x, block):
    """[S, …] → [⌈S / block⌉, block, …], zero-padded."""
    block = min(block, x.shape[0])
    pad = -x.shape[0] % block
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, block, *x.shape[1:])


def _key_blocks(x, block):
    """[S, D] → full blocks [S // block, block, D] and the tail [S mod block, D] (or None)."""
    full = x.shape[0] // block * block
    return x[:full].reshape(-1, block, x.shape[1]), (x[full:] if full < x.shape[0] else None)


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scan_keys(step, carry, k, v, block):
    """lax.scan of step over the key blocks, then the tail; per-block outputs concatenated along keys."""
    (k_blocks, k_tail), (v_blocks, v_tail) = _key_blocks(k, block), _key_blocks(v, block)
    carry, out = lax.scan(step, carry, (k_blocks, v_blocks))
    out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)
    if k_tail is not None:
        carry, tail = step(carry, (k_tail, v_tail))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return carry, out


def _head_forward(q, k, v, tiling):
    """One head: q [S_q, D] (scaled), k, v [S_k, D] → output [S_q, D] (q's dtype), log-sum-exp [S_q]."""
    def query_block(qb):
        def step(carry, kv):
            m, l, acc = carry
            kb, vb = kv
            s = _dot("qd,kd->qk", qb, kb)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[:, None])
            rescale = jnp.exp(m - m_new)
            acc = acc * rescale[:, None] + _dot("qk,kd->qd", p.astype(vb.dtype), vb)
            return (m_new, l * rescale + p.sum(-1), acc), None

        rows = qb.shape[0]
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((rows, v.shape[1]), jnp.float32))
        (m, l, acc), _ = _scan_keys(step, init, k, v, tiling.key_block)
        return (acc / l[:, None]).astype(q.dtype), m + jnp.log(l)

    o, lse = lax.map(query_block, _query_blocks(q, tiling.query_block))
    return o.reshape(-1, o.shape[-1])[:q.shape[0]], lse.reshape(-1)[:q.shape[0]]


def _head_backward(q, k, v, o, lse, do, tiling):
    """Flash-attention backward of one head: per tile, P = exp(S − lse), dV += Pᵀ dO,
    dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ += dS K, dK += dSᵀ Q (q scaled; dQ gets the scale outside)."""
    delta = _dot("qd,qd->q", do, o)

    def query_block(dkv, x):
        qb, dob, lseb, deltab = x

        def step(dq, kv):
            kb, vb = kv
            p = jnp.exp(_dot("qd,kd->qk", qb, kb) - lseb[:, None])
            ds = p * (_dot("qd,kd->qk", dob, vb) - deltab[:, None])
            dq = dq + _dot("qk,kd->qd", ds.astype(kb.dtype), kb)
            return dq, (_dot("qk,qd->kd", ds.astype(qb.dtype), qb), _dot("qk,qd->kd", p.astype(dob.dtype), dob))

        dq, (dk, dv) = _scan_keys(step, jnp.zeros(qb.shape, jnp.float32), k, v, tiling.key_block)
        return (dkv[0] + dk, dkv[1] + dv), dq

    blocks = [_query_blocks(x, tiling.query_block) for x in (q, do, lse, delta)]
    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros), blocks)
    return dq.reshape(-1, dq.shape[-1])[:q.shape[0]], dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, scale, tiling):
    return _blockwise_fwd(q, k, v, scale, tiling)[0]


def _blockwise_fwd(q, k, v, scale, tiling):
    qs = _heads(q) * jnp.asarray(scale, q.dtype)
    o, lse = _over_heads(functools.partial(_head_forward, tiling=tiling), tiling, qs, _heads(k), _heads(v))
    return _unheads(o, q), (qs, k, v, o, lse)


def _blockwise_bwd(scale, tiling, res, do):
    qs, k, v, o, lse = res
    dq, dk, dv = _over_heads(functools.partial(_head_backward, tiling=tiling), tiling,
                             qs, _heads(k), _heads(v), o, lse, _heads(do))
    return (_unheads(dq * scale, do).astype(qs.dtype), _unheads(dk, k).astype(k.dtype),
            _unheads(dv, v).astype(v.dtype))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
