"""Figure of a sweep's reconstructions: `python scripts/make_figure.py SWEEP_DIR` (see g2d2/experiment/figures.py)."""

from g2d2.experiment.figures import main

if __name__ == "__main__":
    main()
