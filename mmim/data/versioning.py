"""DVC adapter: build, share and identify feature stores through DVC's Python API.

Each dataset in params.yaml has a stage `extract@<name>` (dvc.yaml) whose output is
`data/stores/<name>`. Its content hash, as recorded in dvc.lock, is the data version
that every training run records. Workers on machines that do not share a disk either
`pull` the store into a checkout of the repository, or `fetch_store` it straight from
the Git repository and its DVC remote without a checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError
from dvc.dependency import Dependency
from dvc.exceptions import DvcException
from dvc.fs import DVCFileSystem
from dvc.repo import Repo
from dvc.repo.graph import collect_pipeline
from dvc.stage import Stage

from mmim.core.config import DataConfig
from mmim.core.errors import MMIMInputError, ServiceUnavailableError, first_line
from mmim.core.store import FeatureStore

STORES_DIR = "data/stores"


def stage_name(dataset: str) -> str:
    return f"extract@{dataset}"


def store_path(dataset: str) -> str:
    """The store of `dataset`, relative to the repository root."""
    return f"{STORES_DIR}/{dataset}"


@contextmanager
def _open(repo_root: str | Path) -> Iterator[Repo]:
    """The repository, with the working directory at its root.

    DVC resolves stage targets and paths against the working directory, so its API is
    used from the root (this changes the process's cwd for the duration of the call).
    """
    root = Path(repo_root).resolve()
    try:
        with chdir(root), Repo(str(root)) as repo:
            yield repo
    except (DvcException, OSError, BotoCoreError, ClientError) as error:
        # OSError covers missing paths and refused connections; botocore's errors an S3
        # remote that cannot be reached or refuses the credentials.
        reason = first_line(error)
        kind = ServiceUnavailableError if _unreachable(error) else MMIMInputError
        raise kind(f"dvc in {repo_root}: {reason}") from None


def _unreachable(error: BaseException) -> bool:
    """Whether `error`, or what it wraps, says that a remote did not answer."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (ConnectionError, TimeoutError, EndpointConnectionError, ConnectTimeoutError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def _this_environment_first() -> Iterator[None]:
    """Stage commands call `mmim` and `dvc`: run them from this interpreter's environment."""
    scripts = str(Path(sys.executable).parent)
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{scripts}{os.pathsep}{before}"
    try:
        yield
    finally:
        os.environ["PATH"] = before


def reproduce(dataset: str, repo_root: str | Path = ".", force: bool = False, pull: bool = False) -> list[str]:
    """Run `extract@<dataset>` (and what it depends on) if anything changed.

    With `pull`, outputs that DVC has recorded for the same inputs (its run cache, locally
    or on the remote) are restored instead of rebuilt. Returns the names of the stages
    that ran or were restored: empty when the store was up to date.
    """
    with _open(repo_root) as repo, _this_environment_first():
        stages = repo.reproduce(stage_name(dataset), force=force, pull=pull)
    return [stage.addressing for stage in stages]


def _pipeline_inputs(repo: Repo, dataset: str) -> list[tuple[Stage, list[Dependency]]]:
    """Every stage up to `extract@<dataset>`, with those of its inputs that no stage of
    that pipeline writes (raw releases, code, params)."""
    target = repo.stage.collect(stage_name(dataset))[0]
    pipeline = list(collect_pipeline(target, repo.index.graph))
    produced = {out.fs_path for stage in pipeline for out in stage.outs}
    return [(stage, [d for d in stage.deps if d.fs_path not in produced]) for stage in pipeline]


def _require(repo_root: str | Path, stage: Stage, dependency: Dependency) -> None:
    if dependency.exists:
        return
    path = Path(repo_root) / dependency.def_path
    hint = (
        f': put the {path.name} release there (docs/data.md, "Sources")'
        if dependency.def_path.startswith("data/raw/")
        else ""
    )
    raise MMIMInputError(f"{path}: missing (an input of stage {stage.addressing}){hint}")


def check_inputs(dataset: str, repo_root: str | Path = ".") -> None:
    """Fail with one line naming the first missing input of the stages up to `extract@<dataset>`
    (e.g. data/raw/mosi without the release), before DVC tries to run anything."""
    with _open(repo_root) as repo:
        for stage, dependencies in _pipeline_inputs(repo, dataset):
            for dependency in dependencies:
                _require(repo_root, stage, dependency)


def input_fingerprint(dataset: str, repo_root: str | Path = ".") -> str:
    """A content hash of everything the store of `dataset` is built from.

    Covers every stage up to `extract@<dataset>`: its command, the files it reads (as DVC
    hashes them) and its params. Files that an upstream stage writes are left out, since
    their content follows from that stage's inputs. Equal fingerprints mean equal stores,
    without running anything; DVC's state database makes re-hashing large inputs cheap.
    """
    inputs: dict[str, object] = {}
    with _open(repo_root) as repo:
        for stage, dependencies in _pipeline_inputs(repo, dataset):
            inputs[f"{stage.addressing} cmd"] = stage.cmd
            for dependency in dependencies:
                _require(repo_root, stage, dependency)
                inputs[f"{stage.addressing} {dependency.def_path}"] = dependency.get_hash().value
    encoded = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def _store_hash(repo: Repo, dataset: str) -> str | None:
    """The store's hash as dvc.lock records it; None before the stage ever ran."""
    outs = [
        out
        for stage in repo.stage.collect(stage_name(dataset))
        for out in stage.outs
        if out.def_path == store_path(dataset)
    ]
    return outs[0].hash_info.value if outs and outs[0].hash_info else None


def data_version(dataset: str, repo_root: str | Path = ".") -> str:
    """The store's content hash from dvc.lock, e.g. `3f2a...e1.dir`."""
    with _open(repo_root) as repo:
        version = _store_hash(repo, dataset)
    if not version:
        raise MMIMInputError(
            f"{repo_root}/dvc.lock: no hash for {store_path(dataset)}; run `dvc repro {stage_name(dataset)}` first"
        )
    return version


def ensure_store(dataset: str, repo_root: str | Path = ".", expected_version: str | None = None) -> Path:
    """The store of `dataset` in the checkout, with the data version `expected_version`.

    A missing store (a cleaned workspace, or a pipeline step restored from the cache of
    another checkout) is restored by DVC from its cache or remote, or rebuilt.
    """
    path = Path(repo_root) / store_path(dataset)
    if not path.is_dir():
        reproduce(dataset, repo_root, pull=True)
    found = data_version(dataset, repo_root)
    if expected_version and found != expected_version:
        raise MMIMInputError(
            f"{path}: data version {found}, expected {expected_version}; "
            "the store was rebuilt differently (rerun the flow with refresh)"
        )
    return path


def push(dataset: str, repo_root: str | Path = ".", remote: str | None = None) -> int:
    """Upload the store (and the raw inputs DVC tracks for it) to the remote; returns files sent
    (0 when the remote already had them). Fails, naming the store and the remote, when there
    is nothing to push (dvc.lock records no store) or the remote lacks the store afterwards
    (DVC only warns when its cache lacks files)."""
    with _open(repo_root) as repo:
        version = _store_hash(repo, dataset)
        named = repo.cloud.get_remote(remote)
        where = f"DVC remote {named.name} ({named.path})"
        if not version:
            raise MMIMInputError(
                f"{store_path(dataset)}: nothing to push to {where}: dvc.lock records "
                f"no store (run `dvc repro {stage_name(dataset)}` first)"
            )
        sent = repo.push(targets=[stage_name(dataset)], remote=remote, with_deps=True)
        if not repo.cloud.get_remote_odb(remote).exists(version):  # a directory's listing is pushed after its files
            raise MMIMInputError(
                f"{store_path(dataset)}: version {version} is not on {where} after the push "
                f"(DVC's cache lacks it; `dvc repro -f {stage_name(dataset)}` rebuilds it)"
            )
    return sent


def pull(dataset: str, repo_root: str | Path = ".", remote: str | None = None) -> Path:
    """Download the store recorded in dvc.lock, and the stage outputs it was built from,
    into the checkout (so that `reproduce` then finds nothing to do)."""
    with _open(repo_root) as repo:
        repo.pull(targets=[stage_name(dataset)], remote=remote, with_deps=True)
    return Path(repo_root) / store_path(dataset)


def local_store(data: DataConfig) -> str:
    """The store path on this machine: `data.store` if it is here, otherwise fetched with DVC
    from `data.dvc_url` (Ray workers and job drivers on nodes without a checkout)."""
    if Path(data.store).is_dir() or not data.dvc_url:
        return data.store
    if not data.dvc_dataset:
        raise MMIMInputError("data.dvc_dataset: required with data.dvc_url")
    destination = Path(tempfile.mkdtemp(prefix="mmim-store-")) / data.dvc_dataset
    return str(fetch_store(data.dvc_url, data.dvc_dataset, destination, data.dvc_rev))


def store_version(store: str | Path) -> str:
    """The data version of the store at `store` (on this machine: see local_store): DVC's, when it
    is `data/stores/<name>` of a DVC project in this working directory; else its manifest's
    (FeatureStore.content_version)."""
    root = Path.cwd()
    try:
        relative = Path(store).resolve().relative_to(root / STORES_DIR)
        if len(relative.parts) == 1:
            return data_version(relative.parts[0], root)
    except (ValueError, MMIMInputError):
        pass  # not under data/stores, or not a DVC output (yet)
    return FeatureStore(store, verify_checksums=False).content_version


def fetch_store(url: str, dataset: str, destination: str | Path, rev: str | None = None) -> Path:
    """Copy the store of `dataset` at `rev` of the Git repository `url` to `destination`.

    No checkout is needed: DVC reads dvc.lock from Git and the files from the remote.
    """
    destination = Path(destination)
    try:
        filesystem = DVCFileSystem(url=url, rev=rev)
        filesystem.get(store_path(dataset), str(destination), recursive=True)
    except (DvcException, FileNotFoundError) as error:
        raise MMIMInputError(f"{url}@{rev or 'HEAD'}: cannot fetch {store_path(dataset)} ({error})") from None
    return destination
