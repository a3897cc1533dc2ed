"""Run experiments: `python scripts/run.py [group=option ...]`, `-m` to sweep (see g2d2/experiment/cli.py)."""

from g2d2.experiment.cli import cli

if __name__ == "__main__":
    cli()
