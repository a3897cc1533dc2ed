"""The device a run solves on; with `device=auto` on a node with several GPUs, one GPU per concurrent run.

Hydra's launchers start the jobs of a sweep, but none gives each local job its own GPU: joblib knows nothing
of GPUs, and submitit's local executor sets the same CUDA_VISIBLE_DEVICES for every job. So a run with
`device=auto` claims the first visible GPU that no other g2d2 run on this machine holds, through a lock file
per GPU that it holds (flock) until it ends; the kernel drops the lock when the process dies, so a killed run
frees its GPU. This is a preference, not a scheduler: when every GPU is held the run shares the first one,
as before. An explicit `device=cuda:N` or `cpu` is used as given and claims nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from g2d2.errors import UserError

logger = logging.getLogger(__name__)

#: where the per-GPU lock files live (one folder per user: another user's runs cannot block ours)
LOCK_DIR = Path(tempfile.gettempdir()) / f"g2d2-gpus-{os.getuid()}"


class DeviceError(UserError, ValueError):
    """A device the machine does not have; the message says what to use instead."""


def gpu_ids() -> list[str]:
    """The identity of each visible GPU, in torch's index order: its CUDA_VISIBLE_DEVICES entry (a physical
    index or UUID) when that variable is set, else its index; lock files are named by it, so two runs that
    see the same physical GPU under different indices still exclude each other."""
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in visible.split(",") if entry.strip()][:count]


def _try_lock(path: Path) -> object | None:
    """An open handle holding an exclusive flock on `path`, or None when another process holds it."""
    import fcntl

    handle = open(path, "a")  # noqa: SIM115 - returned, closed by the caller
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextmanager
def claim_device(name: str, lock_dir: Path | None = None) -> Iterator[torch.device]:
    """The torch.device of `name` (auto | cpu | cuda | cuda:N), held for the `with` block.

    auto: cpu without CUDA; else the first visible GPU whose lock file in `lock_dir` (default LOCK_DIR) no
    other run holds, locked until the block ends; the first GPU, unlocked, with a warning when all are held.
    """
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise DeviceError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
            if device.index is not None and device.index >= count:
                raise DeviceError(f"device={name} but only {count} GPU(s) are visible (cuda:0 .. cuda:{count - 1}); "
                                  "use device=auto to take a free one")
        yield device
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        yield torch.device("cpu")
        return
    lock_dir = LOCK_DIR if lock_dir is None else Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    ids = gpu_ids()
    with ExitStack() as stack:
        for index, gpu in enumerate(ids):
            handle = _try_lock(lock_dir / f"gpu-{gpu}.lock")
            if handle is not None:
                stack.callback(handle.close)
                logger.info("device=auto: cuda:%d (GPU %s), held until this run ends", index, gpu)
                yield torch.device("cuda", index)
                return
        logger.warning("device=auto: all %d visible GPUs are held by other g2d2 runs (locks in %s); sharing cuda:0",
                       len(ids), lock_dir)
        yield torch.device("cuda", 0)
