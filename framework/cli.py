"""The command line's name before it moved to framework/launch/cli.py, kept so that sbatch scripts
rendered by earlier versions (``python -m framework.cli train ...``), which Slurm requeues as they
are, and older entry points still start. New code: ``python -m framework`` or ``llada``."""

import sys

from framework.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
