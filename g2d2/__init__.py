"""g2d2: solve image inverse problems y = A x + n with discrete (G2D2) and continuous diffusion priors."""

__version__ = "0.1.0"
