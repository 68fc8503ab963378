"""Benchmarks: measured costs of federation, HE and the training loop (see docs/performance.md)."""
