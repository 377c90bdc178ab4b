"""Benchmark scripts (speed, memory, FLOPs); run as python -m benchmarks.<name>."""
import os


def torch_threads() -> int:
    """torch on every core this process may use (as XLA does), so a CPU comparison is like for like."""
    import torch  # noqa: PLC0415 (optional: only the comparisons with the official model need it)
    n = len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n
