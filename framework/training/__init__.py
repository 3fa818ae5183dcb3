"""The training loop and what it is made of: the Trainer (trainer.py), the factory that builds it
from the config (factory.py), the loss (objective.py), the optimizer and its non-finite guard,
the schedule, the metrics stream, FLOPs and MFU, DeepSpeed's JSON, and stopping early without
losing work (preemption.py)."""
