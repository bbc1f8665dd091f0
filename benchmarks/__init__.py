"""Benchmarks: offline throughput, `pagedserve bench serve`, the seed demos, KV utilisation."""
