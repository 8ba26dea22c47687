"""Elastic runs: the driver watches the cluster's nodes and refreshes Ray's view the moment a node
joins or dies (driver; see `runtime.cluster_view` for why)."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from openclaw.runtime.cluster_view import alive_nodes, coordinator, refresh_coordinator

log = logging.getLogger("openclaw")


def pin_coordinator() -> None:
    """Create Ray Data's autoscaling coordinator from the driver, so that it lives on the driver's node.

    Whoever asks first creates it, pinned (hard node affinity) to the asker's node. If that is a worker
    node that later dies, the detached actor cannot be restarted anywhere and every elastic decision
    after the loss fails ("The actor died unexpectedly"), which is what we saw without this.
    """
    try:
        coordinator()
    except Exception as e:  # elastic runs still work, with slower recovery
        log.warning("could not pin Ray's autoscaling coordinator to the driver's node: %s", e)


class NodeWatcher(threading.Thread):
    """Polls the node table; on a change, refreshes the coordinator and says so (`on_change`).
    `before_grow` runs when nodes join, before Ray is told: the driver has the workers checkpoint, so
    that the resize into the new nodes replays no steps."""

    def __init__(self, interval_s: float, on_change: Callable[[str], None] | None = None,
                 before_grow: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="openclaw-node-watch")
        self.interval_s, self.on_change, self.before_grow = interval_s, on_change, before_grow
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            known = alive_nodes()
        except Exception as e:  # best effort: without the watcher, Ray's own (slower) path still works
            log.warning("node watcher disabled: %s", e)
            return
        while not self._stop_event.wait(self.interval_s):
            try:
                now = alive_nodes()
                if now == known:
                    continue
                lost, joined = known - now, now - known
                known = now
                if joined and self.before_grow:
                    self.before_grow()
                refresh_coordinator()
                if self.on_change:
                    self.on_change(f"cluster changed: {len(lost)} node(s) lost, {len(joined)} joined; "
                                   f"{len(now)} alive")
            except Exception as e:
                log.warning("node watcher: %s", e)

    def stop(self) -> None:
        self._stop_event.set()
