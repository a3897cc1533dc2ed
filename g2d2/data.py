"""Image sources: the embedded evaluation images and any folder of PNG/JPEG files.

Every source yields `(name, image)` with image a (3, H, W) float32 tensor in [-1, 1], centre-cropped
to a square and resized to `image_size` (the DPS / G2D2 preprocessing).

Embedded evaluation images (held out: the tiny priors never train on them): scikit-image's
astronaut, chelsea, coffee and rocket, bundled in its wheel, so the default run needs no download.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from g2d2.errors import UserError

logger = logging.getLogger(__name__)

#: held-out evaluation images (skimage.data names); never used for training
EVAL_IMAGE_NAMES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(UserError, ValueError):
    """Bad data input (empty folder, unreadable file, unknown image name)."""


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert greyscale / palette / RGBA images to RGB, logging the conversion."""
    if image.mode != "RGB":
        logger.info("image %s has mode %s: converted to RGB", name, image.mode)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # composite on white so transparent pixels do not become black
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    return image


def center_crop_resize(image: Image.Image, image_size: int) -> torch.Tensor:
    """Centre crop to a square, resize to image_size (bicubic, antialiased), map to [-1, 1].

    Returns:
        (3, image_size, image_size) float32 tensor.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=None)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().clamp_(-1.0, 1.0)


class ImageSource:
    """A fixed, ordered list of images; subclasses fill `self.names` and implement `load`."""

    def __init__(self, image_size: int) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        name = self.names[index]
        return name, center_crop_resize(to_rgb(self.load(index), name), self.image_size)

    def check(self) -> None:
        """Open every image once, before anything is solved: a corrupt file stops the run at its start
        (DataError naming it), and images smaller than `image_size` get one warning (they are upsampled)."""
        start = time.perf_counter()
        small = []
        for index, name in enumerate(self.names):
            width, height = self.load(index).size
            if min(width, height) < self.image_size:
                small.append(f"{name} ({width}x{height})")
        if small:
            logger.warning(
                "%d of %d images are smaller than image_size=%d and are upsampled, which is not the papers' "
                "protocol (e.g. use FFHQ images1024x1024, not thumbnails128x128): %s%s",
                len(small), len(self.names), self.image_size, ", ".join(small[:3]), ", ..." if len(small) > 3 else "",
            )
        if time.perf_counter() - start > 5:
            logger.info("opened all %d images in %.0f s", len(self.names), time.perf_counter() - start)


def _select(names: list[str], limit: int | None, offset: int) -> list[str]:
    if offset < 0 or (limit is not None and limit < 0):
        raise DataError(f"data.offset and data.limit must be >= 0, got offset={offset}, limit={limit}")
    end = None if limit is None else offset + limit
    return names[offset:end]


class EmbeddedImages(ImageSource):
    """The held-out natural images bundled in scikit-image (no download needed).

    Args:
        image_size: output side length.
        names: skimage.data image names (default: EVAL_IMAGE_NAMES).
        limit: use at most this many images; offset: skip this many first.
    """

    def __init__(
        self,
        image_size: int,
        names: list[str] | tuple[str, ...] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> None:
        super().__init__(image_size)
        import skimage.data

        names = list(names) if names is not None else list(EVAL_IMAGE_NAMES)
        unknown = [n for n in names if not callable(getattr(skimage.data, n, None))]
        if unknown:
            raise DataError(f"unknown embedded image(s) {unknown}; choose from {list(EVAL_IMAGE_NAMES)}")
        self.names = _select(names, limit, offset)
        if not self.names:
            raise DataError("data selects no images: check data.limit / data.offset")

    def load(self, index: int) -> Image.Image:
        import skimage.data

        return Image.fromarray(np.asarray(getattr(skimage.data, self.names[index])()))


class ImageFolder(ImageSource):
    """All PNG/JPEG files of a folder (not recursive), sorted by file name.

    Args:
        path: the folder.
        image_size: output side length.
        limit: use at most this many images; offset: skip this many first (after sorting).
    """

    def __init__(self, path: str, image_size: int, limit: int | None = None, offset: int = 0) -> None:
        super().__init__(image_size)
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist or is not a folder; set data.path")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(
                f"image folder {folder} holds no images with extensions {IMAGE_EXTENSIONS}; "
                "point data.path at a folder of PNG/JPEG files"
            )
        self.folder = folder
        self.names = _select([p.name for p in files], limit, offset)
        if not self.names:
            raise DataError(f"data selects no images from {len(files)} in {folder}: check data.limit / data.offset")

    def load(self, index: int) -> Image.Image:
        path = self.folder / self.names[index]
        try:
            with Image.open(path) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"cannot read image {path} ({err}); remove or replace the corrupt file") from err
