"""atomic_directory: a process killed at any point leaves the old or the new directory whole."""

import logging
import multiprocessing
import os
import shutil
import signal

import pytest

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_directory


def write_version(target, text):
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text(text)
        (staging / "b.txt").write_text(text)


def version(target):
    """The text both files hold, or None when the directory is not whole."""
    texts = {(target / name).read_text() for name in ("a.txt", "b.txt") if (target / name).is_file()}
    return texts.pop() if len(texts) == 1 and len(list(target.iterdir())) == 2 else None


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def die_on_call(module, name, number):
    """Make `module.name` kill the process when it is called the `number`-th time, before it runs."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            kill_self()
        return real(*args, **kwargs)

    setattr(module, name, wrapper)  # in the child process only


KILL_POINTS = {
    "before_rename_1": (os, "replace", 1),
    "before_rename_2": (os, "replace", 2),
    "before_delete": (shutil, "rmtree", 1),
}


def write_and_die(target, kill_at):
    """In a child process: start writing version "new" and die at `kill_at`."""
    if kill_at == "in_block":
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("new")
            kill_self()
    die_on_call(*KILL_POINTS[kill_at])
    write_version(target, "new")


@pytest.mark.parametrize(
    "kill_at, survivor",
    [("in_block", "old"), ("before_rename_1", "old"), ("before_rename_2", "old"), ("before_delete", "new")],
)
def test_sigkill_at_any_step_loses_neither_version(tmp_path, caplog, kill_at, survivor):
    target = tmp_path / "best"
    write_version(target, "old")
    # fork: the child inherits the imports (a fresh interpreter takes seconds to import mmim)
    child = multiprocessing.get_context("fork").Process(target=write_and_die, args=(target, kill_at))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    leftovers = [path for path in tmp_path.iterdir() if path != target]
    assert leftovers, "the kill should leave a staging or aside directory"
    whole = [version(path) for path in tmp_path.iterdir()]
    assert survivor in whole

    # The next call in the same parent restores or cleans up, even when its own block fails.
    with (
        caplog.at_level(logging.WARNING, logger="mmim.core.files"),
        pytest.raises(RuntimeError),
        atomic_directory(target),
    ):
        raise RuntimeError("this run fails too")
    assert list(tmp_path.iterdir()) == [target] and version(target) == survivor
    assert any(path.name in caplog.text for path in leftovers)


def test_staging_of_a_dotted_sibling_is_left_alone(tmp_path):
    sibling_staging = tmp_path / ".store.v2.abcd1234"  # staging of `store.v2`, not of `store`
    sibling_staging.mkdir()
    write_version(tmp_path / "store", "one")
    write_version(tmp_path / "store", "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.v2.abcd1234", "store"]
    assert version(tmp_path / "store") == "two"


@pytest.mark.parametrize("make", [lambda p: p.write_text("a file"), lambda p: p.symlink_to(p.parent)])
def test_a_file_or_link_is_never_replaced(tmp_path, make):
    target = tmp_path / "best"
    make(target)
    with pytest.raises(MMIMInputError, match="best: (exists and is not a directory|is a symbolic link)"):
        write_version(target, "new")
    assert target.is_symlink() or target.read_text() == "a file"
