"""Asynchronous checkpoint saves (``checkpoint.async_save``): the training step waits only for the
state's copy into host memory; writing, hashing, syncing and publishing run in a thread.

DeepSpeed's ``save_checkpoint`` hands each file's state dict to its checkpoint engine. Ours
(``AsyncCheckpointEngine``) copies the tensors into host buffers, pinned on CUDA and reused from
one save to the next (one per storage of each file, so views keep sharing what they shared and the
files hold what a synchronous save writes), and keeps the copies until ``write`` streams them out
through the hashing writer. DeepSpeed's own decoupled engine hands the state to a subprocess
instead, whose queue pickles it: a second copy, and no checksums.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Tuple

import torch

from framework.checkpoint.integrity import HashingCheckpointEngine


class HostCopies:
    """Host buffers reused between saves: (file name, storage's order in it) -> uint8 buffer."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: Dict[Tuple[str, int], torch.Tensor] = {}

    def copy(self, name: str, obj):
        """``obj`` with every tensor replaced by a host tensor over a copy of its storage (the
        copies queued, not waited for: ``AsyncCheckpointEngine.captured`` waits)."""
        seen: Dict[tuple, torch.Tensor] = {}  # a storage of obj -> its host buffer

        def visit(o):
            if torch.is_tensor(o):
                storage = o.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes(), str(o.device))
                host = seen.get(key)
                if host is None:
                    host = self._buffer((name, len(seen)), storage.nbytes())
                    src = torch.empty(0, dtype=torch.uint8, device=o.device).set_(storage)
                    host.copy_(src, non_blocking=True)
                    seen[key] = host
                return torch.empty(0, dtype=o.dtype).set_(
                    host.untyped_storage(), o.storage_offset(), o.size(), o.stride())
            if isinstance(o, dict):
                out = copy.copy(o)  # the same kind of dict (OrderedDict, ...)
                for k, v in o.items():
                    out[k] = visit(v)
                return out
            if isinstance(o, list):
                return [visit(v) for v in o]
            if isinstance(o, tuple):
                items = [visit(v) for v in o]
                return type(o)(*items) if hasattr(o, "_fields") else type(o)(items)
            try:  # a loss scaler, a set: as they are now, not when the thread pickles them
                return copy.deepcopy(o)
            except Exception:  # noqa: BLE001 - not copyable: as it is
                return o

        return visit(obj)

    def _buffer(self, slot: Tuple[str, int], nbytes: int) -> torch.Tensor:
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[slot] = buf
        return buf


class AsyncCheckpointEngine(HashingCheckpointEngine):
    """DeepSpeed's checkpoint engine for asynchronous saves: ``save`` captures a host copy;
    ``captured`` waits for the copies and hands them over; ``write`` writes them (hashing, as
    the synchronous engine does)."""

    def __init__(self, config_params, cuda: bool):
        super().__init__(config_params)
        self.name = "LLaDAAsyncCheckpointEngine"
        self.cuda = cuda
        self.copies = HostCopies(pin=cuda)
        self._queue: List[Tuple[str, object]] = []

    def save(self, state_dict, path: str):
        self._queue.append((path, self.copies.copy(os.path.basename(path), state_dict)))

    def captured(self) -> List[Tuple[str, object]]:
        """The files of this save, their copies complete: the training may change its state."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        queue, self._queue = self._queue, []
        return queue

    def write(self, items: List[Tuple[str, object]]) -> None:
        for path, state in items:
            super().save(state, path)


def async_engine(engine, cuda: bool) -> AsyncCheckpointEngine:
    """The DeepSpeed engine's checkpoint engine, replaced by ours on first use."""
    if not isinstance(engine.checkpoint_engine, AsyncCheckpointEngine):
        engine.checkpoint_engine = AsyncCheckpointEngine(engine._config, cuda)
    return engine.checkpoint_engine
