"""The known harmless messages of our libraries, silenced one by one at their source: a filter for
exactly that message, never a library's whole warning stream. Anything else they say still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, message start, module): Python warnings emitted while importing or building
_WARNINGS = [
    # megatron-core at import, once per module, when neither is installed (our CPU and plain-torch
    # paths do not use them)
    (UserWarning, "Transformer Engine and Apex are not installed", r"megatron\."),
]
# (logger, message part): log records dropped
_LOG_RECORDS = [
    # our optimizer is torch's AdamW (framework/training/optimizer.py); ZeRO partitions its state
    # and we set zero_allow_untested_optimizer on purpose
    ("DeepSpeed", "untested optimizer"),
]


# environment settings the libraries read (the user's environment wins): MLflow's INFO lines (the
# SQLite store creating and migrating its tables) and the run and experiment URLs it prints when
# a run ends are not ours to show (our own line names the run); DeepSpeed imports MLflow for its
# autotuner, so these are set before DeepSpeed is imported
_ENVIRONMENT = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class _Drop(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


def quiet_libraries() -> None:
    """Install the filters (idempotent)."""
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for category, message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, part in _LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.part == part for f in logger.filters):
            logger.addFilter(_Drop(part))
