"""Evaluation of what a run trained: the held-out bound during training and on demand
(``llada validate``)."""
