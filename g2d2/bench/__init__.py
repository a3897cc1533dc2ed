"""The solver cost benchmark (`python scripts/benchmark.py`): rows composed from conf/ as run.py composes them,
random-weight priors of the real shapes (models), step timing and host-sync counting (timing), one profiled
step (profiling), JSON and Markdown outputs (report)."""
