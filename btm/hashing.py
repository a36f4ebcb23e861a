"""SHA-256 of files, read in chunks (files can be many gigabytes)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
            if progress:
                progress(len(b))
    return h.hexdigest()
