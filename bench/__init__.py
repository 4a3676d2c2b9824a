"""Benchmarks for natterd; ``python -m bench.load --help`` is the load generator."""
