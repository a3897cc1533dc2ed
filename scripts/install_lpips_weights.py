"""Build the LPIPS backbone weights offline (see g2d2/experiment/lpips_weights.py)."""

from g2d2.experiment.lpips_weights import main

if __name__ == "__main__":
    main()
