"""File handling shared by the store and checkpoints: whole directories appear at once,
and a file that cannot be read is reported by its path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmim.errors import MMIMInputError


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it replaces `target`.

    On any error the staging directory is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MMIMInputError(f"{path}: corrupt (not valid JSON)") from None
