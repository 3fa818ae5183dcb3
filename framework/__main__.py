"""``python -m framework ...`` is ``llada ...`` (torchrun and srun start ranks this way)."""

import sys

from framework.launch.cli import main

sys.exit(main())
