"""Benchmarks: each a function over one harness (harness.py: scenarios, timers, machine, results); sora-bench is
e2e.py. Results and their generated index are in results/."""
