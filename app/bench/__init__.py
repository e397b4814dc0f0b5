"""Benchmarks: `lamina bench engine` (offline) and `lamina bench serve` (HTTP)."""
