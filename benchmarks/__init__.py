"""Benchmark scripts (speed, memory, FLOPs); run as python -m benchmarks.<name>."""
