"""Train the embedded tiny priors: `python scripts/train_tiny_priors.py --help` (see g2d2/train/cli.py)."""

from g2d2.train.cli import main

if __name__ == "__main__":
    main()
