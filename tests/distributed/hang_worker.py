"""One rank of the hang test, as srun starts it (RANK, WORLD_SIZE, MASTER_* in the environment):
``llada train`` itself, rank 1 made a straggler first (each micro-batch's data 0.15 s late). The
hang is an injected fault (LLADA_FAULTS, framework/training/faults.py)."""

import os
import sys
import time

from framework.launch.cli import main
from framework.training.trainer import Trainer

if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        real = Trainer._next_batch

        def slow(self):
            time.sleep(0.15)
            return real(self)
        Trainer._next_batch = slow
    sys.exit(main(sys.argv[1:]))
