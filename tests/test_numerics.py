"""`torch_linspace`, the one torch.linspace emulation (RoPE grids, DDIM betas, frame selection)."""
import zlib
from fractions import Fraction

import numpy as np
import pytest

from conftest import ROOT
from vapjax.numerics import _round_sum_to_float32, torch_linspace

RECORDED = np.load(ROOT / "tests" / "data" / "torch_linspace_crc.npz")


def test_matches_recorded_torch_linspace():
    """Bit for bit against torch.linspace as recorded on an AVX2 CPU (tests/data/make_torch_linspace.py):
    ~3000 float32/float64 cases (random ranges, integer ranges, RoPE grids, beta schedules). The
    product-rounded formula (no FMA, the old RoPE helper) fails ~90% of the random ones."""
    bad = []
    for a, b, n, f64, crc in zip(*(RECORDED[k] for k in ("start", "end", "n", "float64", "crc32"))):
        got = torch_linspace(float(a), float(b), int(n), np.float64 if f64 else np.float32)
        assert got.dtype == (np.float64 if f64 else np.float32) and got.shape == (n,)
        if zlib.crc32(got.tobytes()) != crc:
            bad.append((float(a), float(b), int(n), "float64" if f64 else "float32"))
    assert not bad, f"{len(bad)} of {len(RECORDED['n'])} differ from torch, e.g. {bad[:5]}"


def _product_rounded(a, b, n):
    """torch.linspace in float32 with the product rounded before the sum (what the RoPE helper did)."""
    a, b = np.float32(a), np.float32(b)
    step = (b - a) / np.float32(n - 1)
    i = np.arange(n)
    return np.where(i < n // 2, a + step * i.astype(np.float32), b - step * (n - 1 - i).astype(np.float32))


def test_recorded_cases_tell_the_methods_apart():
    """The recording catches an ulp: the product-rounded formula misses many of its random cases."""
    rows = [(float(a), float(b), int(n)) for a, b, n, f64 in
            zip(RECORDED["start"], RECORDED["end"], RECORDED["n"], RECORDED["float64"]) if not f64][:300]
    differ = sum(not np.array_equal(_product_rounded(*r), torch_linspace(*r)) for r in rows if r[2] > 1)
    assert differ > 100, differ


def _round_once(value: Fraction) -> np.float32:
    """Reference: the float32 nearest to an exact rational, ties to even."""
    x = np.float32(float(value))
    candidates = (np.nextafter(x, np.float32(-np.inf)), x, np.nextafter(x, np.float32(np.inf)))
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.uint32)) & 1))


def test_float32_rounding_is_single_including_ties():
    """a + b (float64) rounded once to float32, also where the float64 sum lands exactly between two
    float32s and only its rounding error tells the side (double rounding would pick the even one)."""
    rng = np.random.default_rng(0)
    a = rng.uniform(-100, 100, 2000)
    b = rng.uniform(-1, 1, 2000) * 10.0 ** rng.integers(-12, 2, 2000)
    half = np.float64(1 + 2 ** -24)  # exactly between float32 1 and 1 + 2^-23
    a = np.concatenate([a, [half, half, half, -half, 2.0]])
    b = np.concatenate([b, [2 ** -60, -(2 ** -60), 0.0, 2 ** -60, 2 ** -25 + 2 ** -70]])
    got = _round_sum_to_float32(a, b)
    want = np.array([_round_once(Fraction(x) + Fraction(y)) for x, y in zip(a, b)], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[-5] == np.nextafter(np.float32(1), np.float32(2)) and got[-4] == np.float32(1)


def test_small_and_bad_arguments():
    np.testing.assert_array_equal(torch_linspace(3, 7, 1), [3])
    np.testing.assert_array_equal(torch_linspace(0, 8, 5), [0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="float32 or float64"):
        torch_linspace(0, 1, 3, np.float16)
    with pytest.raises(ValueError, match="n must be"):
        torch_linspace(0, 1, 0)
