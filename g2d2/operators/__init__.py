"""Linear forward operators A (the tasks). One module per kind; the interface is in `base`."""

from g2d2.operators.base import LinearOperator
from g2d2.operators.blur import GaussianBlur, MotionBlur
from g2d2.operators.compressive import CompressiveSensing
from g2d2.operators.identity import Identity
from g2d2.operators.inpainting import BoxInpainting, RandomInpainting
from g2d2.operators.resize import SuperResolution

__all__ = [
    "BoxInpainting",
    "CompressiveSensing",
    "GaussianBlur",
    "Identity",
    "LinearOperator",
    "MotionBlur",
    "RandomInpainting",
    "SuperResolution",
]
