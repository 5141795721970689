"""Benchmarks: the speed figures live here, not in timed tests."""
