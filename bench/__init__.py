"""Trident benchmarks: serving load generator, quality (perplexity, greedy agreement) and sweeps."""
