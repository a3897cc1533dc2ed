"""Solver cost benchmark: `python scripts/benchmark.py [--options] [override ...]` (see g2d2/bench/cli.py)."""

from g2d2.bench.cli import main

if __name__ == "__main__":
    main()
