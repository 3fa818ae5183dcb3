"""Experiment tracking in MLflow: one MLflow run per training run, however often it is preempted.

Only the rank that holds the loss (last pipeline stage, tensor rank 0, data rank 0) tracks. Its
``Tracker`` (tracker.py) appends every record (params, tags, step metrics, checkpoint events,
artifacts, the loss curve, the status) as one line to a local outbox (outbox.py),
<run.dir>/tracking/outbox.jsonl: a small write, all the training step pays. A courier
(courier.py), a process of its own (``python -m framework.tracking``), reads what is new and sends
what the server has not acknowledged, in order and batched (``log_batch``), and draws the loss
curve; <run.dir>/tracking/run.json holds the run id
and how far the outbox is sent. In a process of its own, neither the MLflow client's work (an
SQLite store runs inside it) nor matplotlib's takes the trainer's GIL. A server that is down or
fails mid-run costs one warning: training goes on, and everything is sent when it is back, at the
end, or later by ``llada tracking sync RUN_DIR``. The courier ends when the trainer closes its
stdin, on purpose or by dying: a killed job's records are sent all the same.

Resume: the run id travels in checkpoint metadata (and run.json); the next job continues that run.
The outbox holds every step the run has logged, so steps that a killed job logged after its last
checkpoint, and that the resumed job runs again, are not logged twice: the first record of a step
wins (MLflow cannot replace a logged point; metrics.jsonl follows the same rule, and on the same
layout a resume replays those steps exactly). A resume to before a checkpoint the run completed
(a rollback) takes another path: a new run, a child of the old one. One gap is left: a
courier killed between the server's answer to a batch and the line in run.json that records it
sends that batch again.
"""
