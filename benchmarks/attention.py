"""Attention micro-benchmark: vapjax.attention's implementations against torch's
scaled_dot_product_attention, on one shape, interleaved in one process (so that load on a shared
machine hits every contender alike). Prints one JSON line per contender.

    python -m benchmarks.attention                                   # [2, 4292, 8, 64] fp32: mid-size CogVideoX-VAP
    python -m benchmarks.attention --tilings 512x512 1024x512 4292x512h --rounds 5  # tiling sweep
    python -m benchmarks.attention --grad                            # forward + backward
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_threads
from vapjax import attention as attn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[2, 4292, 8, 64], metavar=("B", "S", "N", "D"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tilings", nargs="*", default=["512x512"],
                    help="blockwise tilings QUERYxKEY[h] (h: all heads at once, as on an accelerator)")
    ap.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True, help="include the plain path")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--grad", action="store_true", help="time forward + backward (of the sum of the output)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    b, s, n, d = args.shape
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((b, s, n, d), np.float32) for _ in range(3)]
    dtype = jnp.dtype(args.dtype)
    q, k, v = (jnp.asarray(x, dtype) for x in host)
    scale = 1 / np.sqrt(d)

    def timed_jax(f):
        g = jax.jit(jax.grad(lambda *x: f(*x).astype(jnp.float32).sum(), (0, 1, 2)) if args.grad else f)
        return lambda: jax.block_until_ready(g(q, k, v))

    contenders = {f"blockwise/{t}": timed_jax(functools.partial(_blockwise, scale=scale, tiling=_tiling(t)))
                  for t in args.tilings}
    if args.xla:
        contenders["xla"] = timed_jax(lambda q, k, v: attn.attention(q, k, v, "xla"))
    if args.torch:
        contenders["torch-sdpa"] = _torch_sdpa(host, args.dtype, args.grad)
    for fn in contenders.values():
        fn()                                            # compile and warm up
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = min(times["torch-sdpa"]) if args.torch else None
    for name, ts in times.items():
        print(json.dumps({"bench": "attention", "impl": name, "shape": args.shape, "dtype": args.dtype,
                          "grad": args.grad, "device": jax.devices()[0].device_kind, "median_s": float(np.median(ts)),
                          "min_s": min(ts), "times_s": [round(t, 4) for t in ts],
                          "min_over_torch_min": min(ts) / base if base else None}))


def _blockwise(q, k, v, scale, tiling):
    return attn.blockwise_attention(q, k, v, scale, tiling)


def _tiling(spec: str) -> attn.Tiling:
    qb, kb = spec.rstrip("h").split("x")
    return attn.Tiling(query_block=int(qb), key_block=int(kb), heads_at_once=spec.endswith("h"))


def _torch_sdpa(host, dtype, grad):
    import torch  # noqa: PLC0415
    torch_threads()
    q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)).transpose(1, 2).contiguous().requires_grad_(grad)
               for x in host)

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if grad:
            out.float().sum().backward()

    return run


if __name__ == "__main__":
    main()
