"""Atomic writes: write to a temporary name beside the destination, then rename it into place
with os.replace, so a reader sees the old file or the new one and never half of one.

`tmp_name` is the temporary's file name in the destination's directory; it defaults to
`<name>.tmp`. Callers whose temporaries must not collide (several processes writing the same
destination) or must be recognisable (a sweeper of leftovers) pass their own.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(dst: str | os.PathLike, tmp_name: str | None = None) -> Path:
    """Where the temporary for `dst` goes."""
    dst = Path(dst)
    return dst.with_name(tmp_name or dst.name + ".tmp")


def unique_tmp_name(dst: str | os.PathLike) -> str:
    """A temporary's name for `dst` that no concurrent writer of `dst` shares, ending in
    `.tmp` (what a sweeper of leftovers looks for)."""
    return f"{Path(dst).name}.{uuid.uuid4().hex[:8]}.tmp"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def replacing(dst: str | os.PathLike, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield the temporary path for `dst`; when the block ends without an exception, rename the
    temporary onto `dst`. When it raises, the temporary (a file, or a directory the block
    made there) is removed and `dst` is left as it was."""
    dst = Path(dst)
    tmp = temp_path(dst, tmp_name)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, tmp_name: str | None = None) -> None:
    """Write `text` to `path` atomically, flushed to disk before the rename."""
    with replacing(path, tmp_name) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, link: bool = False,
              tmp_name: str | None = None) -> None:
    """Copy `src` to `dst` atomically. With `link`, hard-link instead where the file system
    allows it (same device), else copy."""
    with replacing(dst, tmp_name) as tmp:
        linked = False
        if link:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:
                pass
        if not linked:
            shutil.copyfile(src, tmp)
