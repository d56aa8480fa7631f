"""Benchmarks for wsproxy; see loadtest/README.md."""
