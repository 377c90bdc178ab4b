"""Numerics shared by the models, the sampler and the frame selection: torch's rounding, reproduced.

`torch_linspace` is torch.linspace as its CPU kernels (AVX2 / AVX-512, each element one fused
multiply-add) and its CUDA kernel compute it: step = (end − start)/(n − 1) rounded to the dtype; the
first half of the elements is start + step·i, the second half end − step·(n − 1 − i), each evaluated
exactly and rounded once to the dtype. (torch's scalar fallback kernel, on x86 CPUs without AVX2,
rounds the product first and can differ by an ulp; the official runs are on GPUs and AVX2 CPUs.)
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def torch_linspace(start: float, end: float, n: int, dtype=np.float32) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=dtype) for float32 or float64, bit for bit (module doc)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"torch_linspace: dtype must be float32 or float64, got {dtype}")
    if n < 1:
        raise ValueError(f"torch_linspace: n must be >= 1, got {n}")
    start, end = dtype.type(start), dtype.type(end)
    if n == 1:
        return np.array([start], dtype)
    step = (end - start) / dtype.type(n - 1)
    i = np.arange(n)
    first = i < n // 2
    base = np.where(first, np.float64(start), np.float64(end))
    mult = np.where(first, i, -(n - 1 - i))
    if dtype == np.float64:  # exact rationals; Python's int / int is correctly rounded
        s, e, d = Fraction(float(start)), Fraction(float(end)), Fraction(float(step))
        return np.array([float((s if f else e) + d * int(m)) for f, m in zip(first, mult)], np.float64)
    return _round_sum_to_float32(base, np.float64(step) * mult)  # a float32 times an int < 2^29: exact


def _round_sum_to_float32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32(a + b) rounded once, for float64 a, b: the float64 sum plus its exact error (TwoSum);
    rounding the sum to float32 is right unless it sits exactly between two float32s while the error
    says which side the exact value is on."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.where(r64 < s, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf)))
    tie = (r64 != s) & (2 * s == r64 + other.astype(np.float64))
    toward = np.where(err > 0, np.maximum(r, other), np.minimum(r, other))
    return np.where(tie & (err != 0), toward, r).astype(np.float32)
