"""The errors a user fixes by changing an input: a config value, the data, a checkpoint, the output folder.

Each module raises its own kind (`runner.ConfigError`, `data.DataError`, `priors.checkpoints.CheckpointError`,
`metrics.LPIPSWeightsMissingError`, `results.ResultsError`), all subclasses of `UserError`, with a message
that names the key or file and what to do. `scripts/run.py` prints such an error as one line and exits
with status 2 (HYDRA_FULL_ERROR=1 shows the traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An input the user has to change; the message says which and how."""
