"""Sweep folder -> paper table: `python scripts/make_table.py SWEEP_DIR [--status] [options]`.

See g2d2/experiment/table_cli.py.
"""

import sys

from g2d2.experiment.table_cli import main

if __name__ == "__main__":
    sys.exit(main())
