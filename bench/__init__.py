"""Benchmarks (sora-bench): scenarios as data, results as JSON and Markdown. Empty until the bench issue lands."""
