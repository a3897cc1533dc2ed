"""Every image source of the experiments: the embedded evaluation images, any folder of PNG/JPEG
files, and the papers' evaluation sets (FFHQ 1k, ImageNet val 1k) from local files.

Every source yields `(name, image)` with image a (3, H, W) float32 tensor in [-1, 1], centre-cropped
to a square and resized to `image_size` (the DPS / G2D2 preprocessing).

Embedded evaluation images (held out: the tiny priors never train on them): scikit-image's
astronaut, chelsea, coffee and rocket, bundled in its wheel, so the default run needs no download.

The papers' sets, from local files only (point conf/data/ffhq.yaml, imagenet.yaml at folders you
have), with the same preprocessing at 256 px:

- FFHQ 1k (DPS, G2D2): the first 1000 images of the FFHQ release, i.e. folder 00000 of
  images1024x1024 (00000.png .. 00999.png). `ImageFolder` sorts relative paths, so pointing
  it at the release root (with sub-folders 00000, 01000, ...) or at 00000 itself selects the same
  1000 images.
- ImageNet 1k: a folder with the 1000 chosen validation images, or the full validation folder
  (flat, or one sub-folder per class) plus a `file_list` naming the images to use. The list format
  is one image per line, `<file name or relative path> [<class index 0..999>]`, as in the
  `imagenet_val_1k.txt` list used by DDRM / DDNM (one validation image per class). The class
  index, when given, yields the "a photo of <class>" prompt of the G2D2 ImageNet experiments.
  Class names (`imagenet_class_names`): "full" = the WordNet labels of the public G2D2 code's
  imagenet1000_clsidx_to_labels.txt ("tench, Tinca tinca"), shipped as g2d2/assets/imagenet_class_labels.txt;
  "torchvision" = torchvision's short category names ("tench"); or a file of one name per line.
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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8 (clamped, rounded): what every saved picture shows."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.movedim(-3, -1).cpu().numpy()


class ImageSource:
    """A fixed, ordered list of images; subclasses fill `self.names` and implement `load`.

    `shard` / `num_shards` do not change the list: `indices` is the shard's block of it, so an image keeps
    its index (its position in the whole list) in whichever shard solves it.
    """

    def __init__(self, image_size: int, shard: int = 0, num_shards: int = 1) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if not 0 <= shard < num_shards:
            raise DataError(f"data.shard must be in 0 .. data.num_shards-1, got shard={shard}, num_shards={num_shards}")
        self.image_size = int(image_size)
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    @property
    def indices(self) -> range:
        """The indices of this shard's images (all of them with num_shards=1)."""
        return shard_range(len(self.names), self.shard, self.num_shards)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        name = self.names[index]
        return name, center_crop_resize(to_rgb(self.load(index), name), self.image_size)

    def check(self) -> None:
        """Open every image of the shard once, before anything is solved: a corrupt file stops the run at its
        start (DataError naming it), and images smaller than `image_size` get one warning (they are upsampled)."""
        start = time.perf_counter()
        small = []
        indices = self.indices
        for index in indices:
            name = self.names[index]
            width, height = self.load(index).size
            if min(width, height) < self.image_size:
                small.append(f"{name} ({width}x{height})")
        if small:
            logger.warning(
                "%d of %d images are smaller than image_size=%d and are upsampled, which is not the papers' "
                "protocol (e.g. use FFHQ images1024x1024, not thumbnails128x128): %s%s",
                len(small), len(indices), self.image_size, ", ".join(small[:3]), ", ..." if len(small) > 3 else "",
            )
        if time.perf_counter() - start > 5:
            logger.info("opened all %d images in %.0f s", len(indices), time.perf_counter() - start)


def shard_range(count: int, shard: int, num_shards: int) -> range:
    """The indices of shard `shard` of `num_shards`: contiguous blocks of `range(count)` whose sizes differ by
    at most one. The indices are positions in the whole (unsharded) list, so image i keeps its index, and
    with it its generator, record, PNG and operator file names, in whichever shard it falls."""
    return range(count * shard // num_shards, count * (shard + 1) // num_shards)


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
        shard, num_shards: solve block `shard` of `num_shards` of them (see ImageSource).
    """

    def __init__(
        self,
        image_size: int,
        names: list[str] | tuple[str, ...] | None = None,
        limit: int | None = None,
        offset: int = 0,
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        super().__init__(image_size, shard, num_shards)
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


def read_file_list(path: str | Path) -> list[tuple[str, int | None]]:
    """Parse a list of images: `<name> [<class index>]` per line; blank lines and `#` comments skipped.

    Returns:
        [(name, label or None)] in file order.
    """
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"file list {path} does not exist; set data.file_list to a text file or null")
    entries: list[tuple[str, int | None]] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
            raise DataError(f"{path}:{number}: expected '<name> [<class index>]', got {raw!r}")
        entries.append((parts[0], int(parts[1]) if len(parts) == 2 else None))
    if not entries:
        raise DataError(f"file list {path} names no images")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise DataError(f"file list {path} names some images twice; each image must appear once")
    return entries


class ImageFolder(ImageSource):
    """The PNG/JPEG images of a folder (optionally its sub-folders too), sorted by relative path, or
    those named by a file list (conf/data/folder.yaml, ffhq.yaml).

    Args:
        path: the folder.
        image_size: output side length (centre crop + resize).
        file_list: optional text file of `<name> [<class index>]` lines; names are paths relative to
            `path` or bare file names found anywhere below it. None = every image, sorted by
            relative path.
        recursive: also list images in sub-folders (ignored for names given by a file list).
        limit: use at most this many images; offset: skip this many first (after sorting / listing).
        shard, num_shards: solve block `shard` of `num_shards` of them (see ImageSource).
    """

    def __init__(
        self,
        path: str,
        image_size: int,
        file_list: str | None = None,
        recursive: bool = False,
        limit: int | None = None,
        offset: int = 0,
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        super().__init__(image_size, shard, num_shards)
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist or is not a folder; set data.path")
        self.folder = folder
        self.labels: list[int | None]
        if file_list:
            listed = read_file_list(file_list)
            entries = _select(listed, limit, offset)
            self.files = self._resolve(entries, file_list)
            self.labels = [label for _, label in entries]
        else:
            pattern = "**/*" if recursive else "*"
            files = sorted(
                (p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                key=lambda p: p.relative_to(folder).as_posix(),
            )
            if not files:
                raise DataError(
                    f"image folder {folder} holds no images with extensions {IMAGE_EXTENSIONS}"
                    f"{' (searched recursively)' if recursive else ''}; point data.path at a folder of PNG/JPEG files"
                )
            self.files = _select(files, limit, offset)
            self.labels = [None] * len(self.files)
        #: images the folder (or list) offers before limit / offset select from them
        self.num_available = len(listed) if file_list else len(files)
        if not self.files:
            raise DataError(f"data selects no images from {folder}: check data.limit / data.offset")
        self.names = [p.relative_to(folder).as_posix() for p in self.files]

    def _resolve(self, entries: list[tuple[str, int | None]], file_list: str) -> list[Path]:
        """Map each listed name to a file: relative path first, else a unique bare name below the folder."""
        by_name: dict[str, list[Path]] | None = None
        files, missing = [], []
        for name, _ in entries:
            direct = self.folder / name
            if direct.is_file():
                files.append(direct)
                continue
            if by_name is None:  # index the folder once, only when needed
                by_name = {}
                for p in self.folder.rglob("*"):
                    if p.is_file():
                        by_name.setdefault(p.name, []).append(p)
            found = by_name.get(Path(name).name, [])
            if len(found) == 1:
                files.append(found[0])
            elif len(found) > 1:
                raise DataError(f"{name} (from {file_list}) matches several files below {self.folder}: {found[:3]}")
            else:
                missing.append(name)
        if missing:
            raise DataError(
                f"{len(missing)} of {len(entries)} images named in {file_list} are not below {self.folder} "
                f"(first: {missing[:3]}); check data.path and data.file_list"
            )
        return files

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                image = image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"cannot read image {path} ({err}); remove or replace the corrupt file") from err
        return image


#: the 1000 full ImageNet labels, one per line in class-index order ("tench, Tinca tinca", ...): the WordNet
#: lemmas of the ILSVRC-2012 synsets, identical to the imagenet1000_clsidx_to_labels.txt the public G2D2
#: code builds its prompts from (taken from timm's imagenet_synsets.txt + imagenet_synset_to_lemma.txt)
IMAGENET_FULL_LABELS = Path(__file__).resolve().parent / "assets" / "imagenet_class_labels.txt"
#: named choices of `imagenet_class_names` (anything else is a path to a file)
CLASS_NAME_SETS = ("full", "torchvision")


def imagenet_class_names(source: str | None = None) -> list[str]:
    """The 1000 ImageNet class names in class-index order.

    Args:
        source: "full" (the public G2D2 code's full labels, "tench, Tinca tinca"; shipped asset),
            "torchvision" or None (torchvision's short names, "tench"), or a text file with one name
            per line in index order.
    """
    if source is None or source == "torchvision":
        # torchvision ships the category names with its weight metadata (no download)
        from torchvision.models import ResNet50_Weights

        names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        origin = "torchvision"
    else:
        path = IMAGENET_FULL_LABELS if source == "full" else Path(str(source)).expanduser()
        if not path.is_file():
            raise DataError(
                f"ImageNet class-name file {path} does not exist; set data.class_names to "
                f"{' or '.join(CLASS_NAME_SETS)} or to a file with one name per line"
            )
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        origin = str(path)
    if len(names) != 1000:
        raise DataError(f"expected 1000 ImageNet class names, got {len(names)} from {origin}")
    return names


class ImageNetSubset(ImageFolder):
    """ImageNet validation images with their class labels and text prompts.

    Args:
        path, image_size, file_list, recursive, limit, offset, shard, num_shards: as ImageFolder.
        prompt_template: turns a class name into a prompt (G2D2: "a photo of {}").
        class_names: "full" (the public G2D2 code's labels, "tench, Tinca tinca"), "torchvision" or None
            (torchvision's short names, "tench"), or a text file with the 1000 names (one per line, index
            order); see `imagenet_class_names`.
    """

    def __init__(
        self,
        path: str,
        image_size: int,
        file_list: str | None = None,
        recursive: bool = True,
        limit: int | None = None,
        offset: int = 0,
        shard: int = 0,
        num_shards: int = 1,
        prompt_template: str = "a photo of {}",
        class_names: str | None = None,
    ) -> None:
        super().__init__(path, image_size, file_list=file_list, recursive=recursive, limit=limit, offset=offset,
                         shard=shard, num_shards=num_shards)
        if "{}" not in prompt_template:
            raise DataError(f"prompt_template must contain '{{}}' for the class name, got {prompt_template!r}")
        self.prompt_template = prompt_template
        self._class_names_path = class_names
        self._class_names: list[str] | None = None
        bad = [label for label in self.labels if label is not None and not 0 <= label < 1000]
        if bad:
            raise DataError(f"ImageNet class indices must be in 0..999, got e.g. {bad[:3]}")
        if not file_list and self.num_available > len(self.files):
            logger.warning(
                "data=imagenet without a file list: using %d of the %d images below %s in sorted order, not "
                "the papers' 1k evaluation list (one image per class, with labels); set data.file_list or "
                "G2D2_IMAGENET_LIST to imagenet_val_1k.txt", len(self.files), self.num_available, self.folder,
            )

    def class_name(self, index: int) -> str | None:
        """The class name of image `index`, or None when the file list gave no label."""
        label = self.labels[index]
        if label is None:
            return None
        if self._class_names is None:
            self._class_names = imagenet_class_names(self._class_names_path)
        return self._class_names[label]

    def prompt(self, index: int) -> str | None:
        """The text prompt of image `index` ("a photo of <class>"), or None without a label."""
        name = self.class_name(index)
        return None if name is None else self.prompt_template.format(name)
