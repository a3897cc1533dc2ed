"""Where prior weights come from: an embedded tiny prior, a local folder/file, or a Hugging Face id.

`resolve_checkpoint` turns the `path` of a prior config into a local path, or raises a clear error.
Nothing is downloaded unless the config says `allow_download: true`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from g2d2.errors import UserError

logger = logging.getLogger(__name__)

#: prefix of the priors shipped inside the package (g2d2/priors/weights/<name>)
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint path, id or layout is wrong; the message says what was expected."""


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not os.path.isabs(path)


def resolve_checkpoint(path: str, allow_download: bool = False) -> Path:
    """Return a local path for `path`.

    Args:
        path: `embedded:<name>` (a prior shipped in g2d2/priors/weights), a local file or folder
            (`~` and environment variables are expanded), or a Hugging Face id `owner/name`
            (looked up in the local Hugging Face cache; downloaded only if `allow_download`).
        allow_download: let huggingface_hub fetch a missing hub id.
    Raises:
        CheckpointError: naming the path and what to do.
    """
    if path is None or str(path).strip() in ("", "???"):
        raise CheckpointError("no checkpoint path given: set prior.path to a local folder/file or a hub id")
    path = str(path)
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX):]
        local = EMBEDDED_DIR / name
        if not local.is_dir():
            available = sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir()) if EMBEDDED_DIR.is_dir() else []
            raise CheckpointError(
                f"embedded prior '{name}' not found in {EMBEDDED_DIR} (available: {available}); "
                "train it with `python scripts/train_tiny_priors.py` or pick another prior"
            )
        return local
    local = Path(os.path.expandvars(os.path.expanduser(path)))
    if local.exists():
        return local
    if _looks_like_hub_id(path):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=path, local_files_only=not allow_download))
        except Exception as err:  # noqa: BLE001 - re-raised with guidance
            raise CheckpointError(
                f"checkpoint '{path}' is not a local path and is not in the Hugging Face cache "
                f"({type(err).__name__}). Download it once (`huggingface-cli download {path}`) or set "
                "prior.path to a local folder, or set prior.allow_download=true"
            ) from err
    raise CheckpointError(f"checkpoint path '{path}' does not exist; set prior.path to an existing file or folder")
