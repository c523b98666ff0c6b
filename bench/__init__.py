"""Benchmarks of the agent against the raw work it drives (see bench/README.md)."""
