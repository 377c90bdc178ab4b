"""Records torch.linspace's results (as CRC-32 of the raw bytes) for tests/test_numerics.py.

    python tests/data/make_torch_linspace.py    # on a CPU whose torch.backends.cpu capability is AVX2/AVX512

The recording pins what the official runs compute (GPUs and AVX2 CPUs: one fused multiply-add per
element), so the test does not depend on the CPU it runs on. Cases: random ranges of both signs and
scales, integer ranges (frame selection), the RoPE grids and the DDIM beta schedules.
"""
import pathlib
import zlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).with_name("torch_linspace_crc.npz")


def cases():
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        for trial in range(300):
            n = int(rng.integers(1, 400))
            kind = trial % 5
            if kind == 0:
                a, b = 0.0, float(rng.integers(0, 1000))
            elif kind == 1:
                a, b = float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))
            elif kind == 2:
                a, b = float(-rng.integers(1, 200)), -1.0
            elif kind == 3:
                a, b = float(rng.uniform(0, 0.1)), float(rng.uniform(0, 0.2))
            else:
                a, b = float(rng.uniform(-1e4, 1e4)), float(rng.uniform(-1e6, 1e6))
            yield a, b, n, dtype
    for k in range(1, 400):                                   # frame selection: floor(linspace(0, k − 1, n))
        for n in (9, 13, 49, 121):
            yield 0.0, float(k - 1), n, "float32"
    for g in range(1, 129):                                   # RoPE grids: crop region edges, time axes
        for top in (0, 1, 3):
            yield float(top), (top + g) * (g - 1) / g, g, "float32"
        yield 0.0, g * (g - 1) / g, g, "float32"
        for refs in (1, 2, 3):
            yield float(-refs * g), -1.0, refs * g, "float32"
    yield 0.00085 ** 0.5, 0.012 ** 0.5, 1000, "float64"       # DDIM scaled_linear betas (√β)
    yield 0.00085, 0.012, 1000, "float32"                      # DDIM linear betas


def main():
    assert torch.backends.cpu.get_cpu_capability() != "DEFAULT", "record on an AVX2/AVX512 CPU"
    rows = list(cases())
    crc = [zlib.crc32(torch.linspace(a, b, n, dtype=getattr(torch, d)).numpy().tobytes()) for a, b, n, d in rows]
    np.savez_compressed(OUT, start=np.array([r[0] for r in rows]), end=np.array([r[1] for r in rows]),
                        n=np.array([r[2] for r in rows], np.int32),
                        float64=np.array([r[3] == "float64" for r in rows]), crc32=np.array(crc, np.uint32),
                        torch=np.array(torch.__version__), capability=np.array(torch.backends.cpu.get_cpu_capability()))
    print(f"{OUT}: {len(rows)} cases, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")


if __name__ == "__main__":
    main()
