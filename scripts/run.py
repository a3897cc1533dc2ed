"""The one entry point: `python scripts/run.py [group=option ...] [key=value ...]`, `-m` to sweep.

Examples:
    python scripts/run.py                                   # G2D2, tiny VQ prior, SR x4, embedded images
    python scripts/run.py -m task=sr4,gauss_deblur solver=g2d2,pinv
    python scripts/run.py solver=dps prior=tiny_ddpm task=inpaint_box
See README.md and conf/ for every option.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a SLURM time limit or preemption, `kill`) unwinds like Ctrl-C: the finished images are
    already on disk, and the W&B run is finished with what it logged instead of being cut off."""
    sys.exit(128 + signum)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from g2d2.runner import run

    signal.signal(signal.SIGTERM, exit_on_sigterm)

    runtime = HydraConfig.get().runtime
    run(cfg, Path(runtime.output_dir), choices=dict(runtime.choices))


if __name__ == "__main__":
    main()
