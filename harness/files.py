"""Files replaced whole: a reader sees the old content or the new, never a part of either.

Every small file the harness publishes (the ``latest`` checkpoint pointers, a rank's failure
record, the exported student) is written through here: to a temporary file in the same
directory (same filesystem, so the rename is atomic), flushed and synced to disk, then renamed
over the target with ``os.replace``. A writer killed midway leaves the target as it was and, at
worst, a hidden ``.<name>.<pid>.tmp`` beside it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def _temp_for(path: Path) -> Path:
    """The temporary name for ``path``: hidden, in its directory, one per process (no two writers share it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (``safetensors.torch.save_file``, ``torch.save``).

    When the block ends normally the file written there is synced to disk and renamed to
    ``path``; when it raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _temp_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` (text is written as UTF-8) in one step."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
