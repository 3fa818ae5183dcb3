"""MLflow's system metrics of the tracking rank's node: CPU and memory, disk, network, and NVIDIA
(pynvml) or AMD (pyrsmi) GPUs where those libraries are present, measured by MLflow's own
monitors in a thread of the courier, so off the training step's path.

MLflow's ``SystemMetricsMonitor`` would also send them, but through a client of its own that
polls the run at every sample and stops for good at the first failed request. Here the courier
sends them with its other records: while the server is down they wait in memory (the newest
MAX_SAMPLES of them), and they are sent when it is back. Their step is MLflow's: the sample's
number, continued across the jobs of a run.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

PREFIX = "system/"  # MLflow's: its UI shows these in the run's System metrics tab
MAX_SAMPLES = 8640  # a day at 10 s

Sample = Tuple[int, int, Dict[str, float]]  # (time in ms, number, metrics)


class SystemSampler:
    """One sample of every monitor each ``interval_s``, kept until ``done`` says it was sent."""

    def __init__(self, interval_s: float, log: Callable[[str], None]):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        import psutil

        self.interval_s, self.log = interval_s, log
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor(), *_gpu_monitors()]
        psutil.cpu_percent()  # the first reading is over the time since this one
        self._samples: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._number = 0
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        metrics: Dict[str, float] = {}
        for monitor in list(self.monitors):
            try:
                monitor.collect_metrics()
                metrics.update({PREFIX + k: float(v)
                                for k, v in monitor.aggregate_metrics().items()})
            except Exception as e:  # noqa: BLE001 - a device gone, a library's error
                self.log(f"llada: warning: system metrics: {type(monitor).__name__} failed "
                         f"({type(e).__name__}: {e}); it is left out from now on")
                self.monitors.remove(monitor)
            finally:
                monitor.clear_metrics()
        with self._lock:
            if len(self._samples) >= MAX_SAMPLES:
                self._samples.popleft()
                if not self._dropped:
                    self.log(f"llada: warning: system metrics: {MAX_SAMPLES} samples wait for "
                             "MLflow; the oldest are dropped from now on")
                self._dropped += 1
            self._samples.append((int(time.time() * 1000), self._number, metrics))
            self._number += 1

    def pending(self, limit: int) -> List[Sample]:
        """The oldest samples not yet sent, as many as hold up to ``limit`` metrics (one at
        least)."""
        out: List[Sample] = []
        count = 0
        with self._lock:
            for sample in self._samples:
                if out and count + len(sample[2]) > limit:
                    break
                out.append(sample)
                count += len(sample[2])
        return out

    def done(self, number: int) -> None:
        """The samples up to ``number`` are on the server."""
        with self._lock:
            while self._samples and self._samples[0][1] <= number:
                self._samples.popleft()

    def close(self) -> None:
        """Stop sampling, with a last sample of the time since the one before (not if a
        monitor hangs: the courier's last records must not wait for it)."""
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval_s))
        if not self._thread.is_alive():
            self.sample()


def _gpu_monitors() -> list:
    """MLflow's GPU monitor, NVIDIA's or else AMD's; none where neither library is present (or
    there is no GPU)."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor
    for kind in (GPUMonitor, ROCMMonitor):
        try:
            return [kind()]
        except Exception:  # noqa: BLE001 - the library is missing, or finds no device
            continue
    return []


def next_step(metric_objs) -> int:
    """The step after a run's last system-metrics sample (0 for none): a resumed job goes on."""
    steps = [m.step for m in metric_objs if m.key.startswith(PREFIX)]
    return max(steps) + 1 if steps else 0


def optional_sampler(interval_s: float, log: Callable[[str], None]) -> Optional[SystemSampler]:
    """None with ``interval_s`` 0, or where MLflow's monitors cannot start (one warning): the
    other records go all the same."""
    if interval_s <= 0:
        return None
    try:
        return SystemSampler(interval_s, log)
    except Exception as e:  # noqa: BLE001 - an MLflow without them, psutil missing
        log(f"llada: warning: no system metrics: {type(e).__name__}: {e}")
        return None
