"""The papers' evaluation sets: FFHQ 1k and the ImageNet validation 1k subset, from local files.

Nothing is downloaded: point the configs at folders you have (conf/data/ffhq.yaml, imagenet.yaml).
Both reuse the preprocessing of g2d2.data (centre crop to a square, bicubic resize to 256, [-1, 1]).

- FFHQ 1k (DPS, G2D2): the first 1000 images of the FFHQ release, i.e. folder 00000 of
  images1024x1024 (00000.png .. 00999.png). `ListedImageFolder` sorts relative paths, so pointing
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
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from g2d2.data import IMAGE_EXTENSIONS, DataError, ImageSource, _select

logger = logging.getLogger(__name__)


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


class ListedImageFolder(ImageSource):
    """Images of a folder (optionally recursive), all of them sorted, or those named by a file list.

    Args:
        path: the folder.
        image_size: output side length (centre crop + resize).
        file_list: optional text file of `<name> [<class index>]` lines; names are paths relative to
            `path` or bare file names found anywhere below it. None = every image, sorted by
            relative path.
        recursive: also list images in sub-folders (ignored for names given by a file list).
        limit: use at most this many images; offset: skip this many first (after sorting / listing).
    """

    def __init__(
        self,
        path: str,
        image_size: int,
        file_list: str | None = None,
        recursive: bool = True,
        limit: int | None = None,
        offset: int = 0,
    ) -> None:
        super().__init__(image_size)
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
                    f"{' (searched recursively)' if recursive else ''}; point data.path at the image folder"
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


class ImageNetSubset(ListedImageFolder):
    """ImageNet validation images with their class labels and text prompts.

    Args:
        path, image_size, file_list, recursive, limit, offset: as ListedImageFolder.
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
        prompt_template: str = "a photo of {}",
        class_names: str | None = None,
    ) -> None:
        super().__init__(path, image_size, file_list=file_list, recursive=recursive, limit=limit, offset=offset)
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
