"""File handling shared by the store, checkpoints and the cache: whole directories appear at
once, one process writes a target at a time (`writing`), and input files are read only when
they are what they claim - regular files (`regular_file`), of a bounded size (`read_text`),
arrays whose headers match their bytes (`read_npz`) - with any problem reported by its path."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.limits import MAX_INPUT_BYTES

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


_held: dict[Path, int] = {}  # targets this process writes, and how deeply (writing() nests)


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Hold the right to write `target` for the block: one process at a time. Another process
    that holds it is a one-line `MMIMInputError` at once, not a wait of unknown length.

    The lock is `flock` on `.NAME.lock` beside `target`, removed by its holder before release;
    the kernel releases it when its holder dies, so a killed run never blocks the next.
    """
    key = target.absolute()
    if key in _held:  # already ours (extraction holds it, then writes the store inside)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    check_replaceable_directory(target)  # its parent can be made and written
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    lock = _lock_file(path, target)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        path.unlink(missing_ok=True)  # while still locked: a process that opened it sees it is stale
        os.close(lock)


def _lock_file(path: Path, target: Path) -> int:
    """An open, flock-ed `path` that is still the file at `path` (not one its last holder
    removed after we opened it)."""
    while True:
        try:
            lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise MMIMInputError(f"{target}: cannot create its lock file {path.name} ({error.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "?"
            os.close(lock)
            raise MMIMInputError(
                f"{target}: another process (pid {holder}) is writing it now; wait for it or choose another path"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(lock).st_ino:
            os.ftruncate(lock, 0)
            os.pwrite(lock, str(os.getpid()).encode(), 0)
            return lock
        os.close(lock)  # removed or replaced since we opened it: try the file there now


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it replaces `target`.

    On any error the staging directory is removed and `target` is left as it was. The
    old directory exists until the new one is in place, so a process killed at any
    point leaves one of them whole; the next call in the same parent puts things right.
    One writer per target at a time (`writing`): what staging it finds is a dead run's.
    """
    check_replaceable_directory(target)
    with writing(target):
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


def regular_file(path: str | Path) -> Path:
    """`path`, if it is a regular file (or a link to one); `MMIMInputError` saying what it is
    otherwise. Checked before opening: a FIFO would block the read, and a device such as
    /dev/zero would never end it. A missing file raises FileNotFoundError, for the caller to name."""
    path = Path(path)
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise MMIMInputError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise MMIMInputError(f"{path}: not a regular file (a device, FIFO or socket); refusing to read it")
    return path


def read_text(path: str | Path, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The text of a regular file of at most `max_bytes` (a config, a manifest: none is larger)."""
    if regular_file(path).stat().st_size > max_bytes:
        raise MMIMInputError(f"{path}: over {max_bytes // 2**20} MB, larger than any file of its kind")
    return Path(path).read_text()


def read_json(path: Path) -> Any:
    """A JSON file, or `MMIMInputError` naming it."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, and integers of over 4,300 digits
        raise MMIMInputError(f"{path}: corrupt (not valid JSON)") from None
    except RecursionError:
        raise MMIMInputError(f"{path}: nested too deeply") from None


def read_npz(path: Path, names: tuple[str, ...], max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays `names` of an uncompressed .npz (what np.savez writes), each checked against
    its header before it is read: a header that declares more data than its member holds,
    or more than `max_bytes` in all, is refused without allocating it. Raises ValueError
    (or OSError, zipfile.BadZipFile) on anything else."""
    arrays, total = {}, 0
    with zipfile.ZipFile(regular_file(path)) as archive:
        for name in names:
            if f"{name}.npy" not in archive.namelist():
                raise ValueError(f"no array {name!r}")
            info = archive.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{name}: compressed, which np.savez never writes")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{name}: .npy format {version}, not one np.savez writes")
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(member)
                if dtype.hasobject:
                    raise ValueError(f"{name}: holds Python objects")
                size = int(np.prod(shape, dtype=object)) * dtype.itemsize
                total += size
                if size != info.file_size - member.tell() or total > max_bytes:
                    raise ValueError(f"{name}: its header declares {shape}, not what the file holds")
                data = np.frombuffer(bytearray(member.read(size)), dtype=dtype)  # writable, as np.load's
            arrays[name] = data.reshape(shape, order="F" if fortran else "C")
    return arrays


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
