"""The documentation stays true: the generated config reference is current, README.md is
short, every command in a `bash runnable` block runs as written, and relative links resolve.

Runnable blocks run in a temporary copy of the project (with `.venv` linked in and
`.venv/bin` first on PATH), one copy per block, the blocks side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKING_PAGES = [*PAGES, ROOT / "infra" / "README.md"]
VENV = Path(sys.prefix)  # the environment running the tests, as `.venv` in the copy

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", "__pycache__", "*.egg-info", ".*_cache"
)
COMMAND_TIMEOUT_S = 120


def runnable_blocks(info: str = "bash runnable") -> list[tuple[str, list[str]]]:
    """(where, commands) of every block whose info string is exactly `info`: `bash runnable`
    (cheap, no service), or `bash runnable ray` (starts a local Ray cluster)."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1).strip() != info:
                continue
            line = text.count("\n", 0, match.start()) + 1
            joined = match.group(2).replace("\\\n", " ")
            commands = [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]
            blocks.append((f"{page.relative_to(ROOT)}:{line}", commands))
    return blocks


def run_block(where: str, commands: list[str], base: Path, timeout_s: int = COMMAND_TIMEOUT_S) -> list[str]:
    """Run a block's commands one after the other in a fresh copy; the failures, described."""
    copy = base / re.sub(r"\W", "_", where)
    shutil.copytree(ROOT, copy, ignore=NOT_COPIED)
    (copy / ".venv").symlink_to(VENV, target_is_directory=True)
    env = {**os.environ, "PATH": f"{copy / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    failures = []
    for command in commands:
        try:
            done = subprocess.run(
                ["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{where}: `{command}` ran past {timeout_s} s")
            break
        if done.returncode != 0:
            failures.append(
                f"{where}: `{command}` exited {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
            break  # the next commands of the block build on this one
    return failures


def test_configuration_reference_is_generated_from_the_config_models():
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate_config_reference.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_is_under_10_kb():
    size = README.stat().st_size
    assert size < 10_000, f"README.md is {size} bytes; move detail to docs/"


def test_commands_marked_runnable_run(tmp_path):
    blocks = runnable_blocks()
    assert any(where.startswith("README.md") for where, _ in blocks), "README.md has no `bash runnable` block"
    assert any(where.startswith("docs/") for where, _ in blocks), "docs/ has no `bash runnable` block"
    with ThreadPoolExecutor(max_workers=len(blocks)) as pool:
        results = pool.map(lambda block: run_block(*block, tmp_path), blocks)
        failures = [failure for result in results for failure in result]
    assert not failures, "\n\n".join(failures)


@pytest.mark.service
def test_commands_marked_runnable_on_ray_run(tmp_path):
    """The seeds and tuning examples, on the demo's data: one block after the other, since each
    starts a Ray cluster as large as the machine."""
    blocks = runnable_blocks("bash runnable ray")
    assert {where.split(":")[0] for where, _ in blocks} >= {"docs/training.md", "docs/tuning.md"}
    failures = [failure for block in blocks for failure in run_block(*block, tmp_path, timeout_s=300)]
    assert not failures, "\n\n".join(failures)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", LINKING_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
