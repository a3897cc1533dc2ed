"""Linear forward operators A (the tasks). One module per kind; the interface is in `base`."""

from g2d2.operators.base import LinearOperator

__all__ = ["LinearOperator"]
