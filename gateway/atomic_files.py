"""Files that readers in other processes see whole: the old content or the new, never half."""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` beside `path` under a name of this process, then rename it into place
    (a rename within one directory is atomic)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)
