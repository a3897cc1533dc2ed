"""The operator interface every task implements.

A task is a linear map A from images (B, C, H, W) in [-1, 1] to measurements, plus Gaussian noise
of std `sigma` on the same scale. Solvers only ever call `forward`, `adjoint`, `pinv` and read
`image_shape`; the runner calls `measure` and `state`.

Randomness (masks, kernels, CS permutations) is drawn once in `__init__` from the `generator`
passed in, so the runner can build one operator per image from a generator seeded by
(cfg.seed, image index) and save `state()` next to the results; `per_image` puts the operators of a
batch together behind the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class LinearOperator:
    """Base class: subclasses implement `forward` and `adjoint` (exactly), and usually `pinv`.

    Args:
        image_size: side length H = W of the images the operator acts on.
        channels: number of image channels C.
    """

    def __init__(self, image_size: int, channels: int = 3) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.channels = int(channels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this operator accepts."""
        return (self.channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x for images x of shape (B, C, H, W); returns the noiseless measurement."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y; satisfies <A x, y> = <x, A^T y> exactly (up to floating point)."""
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Pseudo-inverse A^+ y (or the documented approximate inverse of the subclass)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def measure(self, x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A x + sigma * n with n ~ N(0, I) drawn from `generator` (on the CPU, then moved).

        Raises:
            ValueError: if sigma is negative or x has the wrong shape.
        """
        if sigma < 0:
            raise ValueError(f"measurement noise sigma must be >= 0, got {sigma}")
        self.check_image(x)
        y = self.forward(x)
        if sigma > 0:
            noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device="cpu")
            y = y + sigma * noise.to(y.device)
        return y

    def check_image(self, x: torch.Tensor) -> None:
        """Raise a clear error when x is not a batch of (C, H, W) images this operator accepts."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}; set data.image_size to match the task (task image_size "
                f"{self.image_size})"
            )

    def state(self) -> dict[str, torch.Tensor]:
        """The random draws (mask, kernel, permutation, ...) that define this operator, for saving."""
        return {}

    def cached(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`build()`, computed once per key: what a solver's every step would otherwise recompute (a
        float32 copy of a float64 matrix, a kernel's spectrum). `to` empties the cache."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def as_dtype(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor attribute `name` in `dtype` (cast once per dtype; itself when it already is)."""
        value = getattr(self, name)
        return value if value.dtype == dtype else self.cached((name, dtype), lambda: value.to(dtype))

    def to(self, device: torch.device | str) -> LinearOperator:
        """Move every tensor attribute to `device` (in place), empty the cache, and return self."""
        self.__dict__.pop("_cache", None)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


class PerImageOperators(LinearOperator):
    """The operators of a batch whose images each have their own draw (mask, kernel, CS signs):
    row i of every call goes through operator i. Build it with `per_image`."""

    def __init__(self, operators: list[LinearOperator]) -> None:
        first = operators[0]
        if any(op.image_shape != first.image_shape for op in operators):
            shapes = [op.image_shape for op in operators]
            raise ValueError(f"per-image operators must share one image shape, got {shapes}")
        super().__init__(first.image_size, first.channels)
        self.operators = list(operators)

    def _rows(self, method: str, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != len(self.operators):
            raise ValueError(
                f"this batch was measured with {len(self.operators)} per-image operators, got a batch of "
                f"{t.shape[0]} in {method}"
            )
        return torch.cat([getattr(op, method)(t[i : i + 1]) for i, op in enumerate(self.operators)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows("forward", x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._rows("adjoint", y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self._rows("pinv", y)

    def to(self, device: torch.device | str) -> PerImageOperators:
        for op in self.operators:
            op.to(device)
        return self


def _same_state(a: LinearOperator, b: LinearOperator) -> bool:
    sa, sb = a.state(), b.state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def per_image(operators: list[LinearOperator]) -> LinearOperator:
    """One operator for a batch measured image by image: the first one itself when all have the same
    state (a deterministic task such as SR or Gaussian blur, or a batch of one), else a
    `PerImageOperators` that applies operator i to row i."""
    if not operators:
        raise ValueError("per_image needs at least one operator")
    if all(type(op) is type(operators[0]) and _same_state(op, operators[0]) for op in operators[1:]):
        return operators[0]
    return PerImageOperators(operators)
