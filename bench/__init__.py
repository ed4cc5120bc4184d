"""Benchmarks of the gateway against the demo's real Triton: ``python bench/run.py --quick``."""
