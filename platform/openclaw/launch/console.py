"""The driver's console: progress lines that rank 0 (and the driver's own helpers) put on a Ray queue,
printed by a thread (driver)."""
from __future__ import annotations

import sys
import threading

from openclaw.tracking.progress import format_progress


class ProgressPrinter(threading.Thread):
    def __init__(self, queue, out=None):
        super().__init__(daemon=True, name="openclaw-progress")
        self.queue, self.out, self._stop_event = queue, out or sys.stdout, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.drain(timeout=0.5)

    def drain(self, timeout: float | None = None) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize()) if timeout is None else [
                self.queue.get(timeout=timeout)]
        except Exception:
            return
        for item in items:
            print(format_progress(item), file=self.out, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.drain()
