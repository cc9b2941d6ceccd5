"""File handling shared by the store and checkpoints: whole directories appear at once,
and a file that cannot be read is reported by its path."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmim.core.errors import MMIMInputError

log = logging.getLogger(__name__)


def check_replaceable_directory(target: Path) -> None:
    """Raise `MMIMInputError` naming `target` unless a directory can be created or replaced there.

    Only a directory is ever replaced: a file or a symbolic link at `target` is the
    user's, and replacing a link would drop it rather than update what it points to.
    """
    if target.is_symlink():
        raise MMIMInputError(f"{target}: is a symbolic link; refusing to replace it")
    if target.exists() and not target.is_dir():
        raise MMIMInputError(f"{target}: exists and is not a directory")
    ancestor = next(parent for parent in target.parents if parent.exists())
    if not ancestor.is_dir():
        raise MMIMInputError(f"{target}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MMIMInputError(f"{target}: cannot write in {ancestor} (permission denied)")


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it replaces `target`.

    On any error the staging directory is removed and `target` is left as it was. The
    old directory exists until the new one is in place, so a process killed at any
    point leaves one of them whole; the next call in the same parent puts things right.
    One writer per target at a time: that call removes the staging of any other.
    """
    check_replaceable_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    # Two renames, never a delete first: between them the old directory is still whole
    # under the aside name, and `_recover_leftovers` puts it back if we die there.
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside)


def _leftovers(target: Path) -> list[Path]:
    """Staging (`.NAME.<random>`) and aside (`.NAME.old-<hex>`) directories of `target`.

    A suffix with a dot belongs to another target (`.NAME.x.<random>` is staging of NAME.x).
    """
    prefix = f".{target.name}."
    return sorted(
        path
        for path in target.parent.iterdir()
        if path.name.startswith(prefix)
        and "." not in path.name[len(prefix) :]
        and path.is_dir()
        and not path.is_symlink()
    )


def _recover_leftovers(target: Path) -> None:
    """Undo what a killed run left: restore the old directory if the new one never arrived,
    and remove staging and aside directories."""
    for path in _leftovers(target):
        if path.name.startswith(f".{target.name}.old-") and not target.exists():
            os.replace(path, target)
            log.warning(
                "%s: restored the previous version from %s (its replacement was interrupted)", target, path.name
            )
        else:
            shutil.rmtree(path)
            log.warning("%s: removed %s, left by an interrupted run", target.parent, path.name)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MMIMInputError(f"{path}: corrupt (not valid JSON)") from None


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place: a reader
    sees the old file or the new one, never half of one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
