"""Benchmarks (not tests): `python -m r1jax.bench.sampler` for generation throughput against the memory roofline."""
