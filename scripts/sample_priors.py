"""Sample grids of the tiny priors for docs/: `python scripts/sample_priors.py --help` (see g2d2/train/samples.py)."""

from g2d2.train.samples import main

if __name__ == "__main__":
    main()
