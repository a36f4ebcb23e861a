"""Per-process caches of reads that would otherwise be recomputed on every request:
`manifests` holds published versions' manifests (immutable, keyed by version id); `boards`
holds what is derived from a version's evaluations, which changes only when the version is
evaluated again: leaderboard pages (and the API's JSON of them), the domain posteriors, and
an ELM page's lineage and per-domain figures. Keys carry what invalidates them (the
version's id, and for `boards` the time of its last evaluation), so processes need no
coordination."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()  # outside the lock: two makers of one key do the same work once each
        with self._lock:
            self._d[key] = value
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


manifests = LRU(256)  # version id -> manifest (immutable)
boards = LRU(2048)  # (version id, evaluated at, what) -> a leaderboard page, its JSON, posteriors, ELM figures
