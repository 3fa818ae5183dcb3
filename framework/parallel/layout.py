"""Where each part of the model lives under a pipeline layout, as plain arithmetic (no torch, so
that ``llada plan`` stays light): the stages' bounds, and which layers recompute their
activations."""

from __future__ import annotations

from typing import List, Optional, Sequence


def stage_bounds(num_layers: int, stages: int, layers_per_stage: Sequence[int] = ()) -> List[int]:
    """Piece index where each stage starts, plus the end: the embedding joins the first stage and
    the head the last; the Transformer layers are split as given, else as evenly as possible
    (the earlier stages take one more when they do not divide)."""
    counts = list(layers_per_stage) or [num_layers // stages + (s < num_layers % stages)
                                        for s in range(stages)]
    bounds, at = [0], 1  # piece 0 is the embedding
    for n in counts:
        at += n
        bounds.append(at)
    bounds[-1] += 1  # the head
    return bounds


def recompute_flags(num_layers: int, bounds: Sequence[int], enabled: bool,
                    per_stage: Optional[int]) -> List[bool]:
    """Which layers recompute: all, or the first ``per_stage`` of each stage (they hold their
    activations longest under the 1F1B schedule)."""
    flags = []
    for i in range(num_layers):
        stage = max(s for s in range(len(bounds) - 1) if bounds[s] <= i + 1)
        first = max(bounds[stage], 1) - 1  # the stage's first layer index
        flags.append(enabled and (per_stage is None or i - first < per_stage))
    return flags
