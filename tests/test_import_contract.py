"""The import contract: flows -> tasks -> mmim, and the core loads no service library.

Each module is imported in a fresh process, which then lists the packages it pulled in;
an edge that runs sideways (the core importing Ray, `mmim predict` loading DVC, the flow
loading Ray at import) shows up here as a package that should not be there.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT

SERVICES = ("ray", "mlflow", "dvc", "prefect", "matplotlib", "botocore")
TRAINING = ("mmim.training.engine", "mmim.training.train", "mmim.cluster.distributed")

CORE = (
    "mmim.core.config",
    "mmim.core.model",
    "mmim.training.engine",
    "mmim.core.metrics",
    "mmim.core.store",
    "mmim.core.batches",
    "mmim.core.selection",
)

# module -> what importing it must not load. A module's imports are checked with it: mmim.training.train
# imports the whole core (asserted below), mmim.training.predict the checkpoint, flows.retrain every task.
CONTRACT = {
    # the core and the single-process training on it
    "mmim.training.train": SERVICES,
    # inference: predictions and the checkpoint never pull in training
    "mmim.training.predict": SERVICES + TRAINING,
    # the lifecycle's first step runs before anything trains: no Ray, and MLflow only for drift
    "mmim.lifecycle.checks": ("ray", "mlflow", "prefect", "matplotlib") + TRAINING,
    # `mmim train` without --track: the checks and the training, no MLflow until a run is tracked
    "mmim.lifecycle.retrain": ("ray", "mlflow", "prefect", "matplotlib"),
    # the MLflow side and the Ray side meet only in the lifecycle
    "mmim.registry.scoring": ("ray", "prefect") + TRAINING,
    # serving is MLflow's, and nothing else's
    "mmim.registry.serving": ("ray", "dvc", "prefect", "matplotlib") + TRAINING,
    # `mmim predict`, `mmim --help`: adapters load when a command needs them
    "mmim.cli": SERVICES
    + ("mmim.cluster.distributed", "mmim.registry.tracking", "mmim.data.versioning", "mmim.lifecycle.retrain"),
    # the pipeline: Prefect and DVC, but Ray, MLflow and plotting only inside the steps that use them
    "flows.retrain": (
        "ray",
        "mlflow",
        "matplotlib",
        "mmim.cluster.distributed",
        "mmim.registry.tracking",
        "mmim.registry.versions",
    ),
}

# One interpreter imports what every layer may use (torch, transformers, ...) once, then forks a
# child per module, all at once: each child starts from that state, imports its module and lists
# sys.modules (blocking on its pipe until the parent reads it).
PROBE = """
import importlib, json, os, sys
import numpy, pydantic, rich, safetensors, torch, torch.nn.parallel, torch.utils.data, yaml  # allowed
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel  # in every layer
assert not {"ray", "mlflow", "dvc", "prefect", "matplotlib", "botocore", "mmim"} & set(sys.modules)
pipes = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        importlib.import_module(module)
        with os.fdopen(write, "w") as pipe:
            json.dump(sorted(sys.modules), pipe)
        os._exit(0)
    os.close(write)
    pipes[module] = read
loaded = {}
for module, read in pipes.items():
    with os.fdopen(read) as pipe:
        loaded[module] = json.load(pipe)
for _ in pipes:
    assert os.wait()[1] == 0
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """module -> every module loaded after importing it in a fresh process."""
    modules = list(CONTRACT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout
    return {module: set(names) for module, names in json.loads(out).items()}


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_import_contract(module, loaded):
    loaded = loaded[module]
    broken = sorted(name for name in CONTRACT[module] if name in loaded)
    assert not broken, f"importing {module} loads {', '.join(broken)}"
    if module == "mmim.training.train":
        assert set(CORE) <= loaded  # so the core is checked with it
    if module == "mmim.training.predict":
        assert "mmim.training.checkpoint" in loaded
    if module == "flows.retrain":
        assert {"tasks.features", "tasks.checks", "tasks.training", "tasks.registration"} <= loaded


def test_the_probe_sees_what_an_import_loads(loaded):
    """The check can fail: what a layer is allowed to load does show up."""
    assert "mlflow" in loaded["mmim.registry.serving"] and "prefect" in loaded["flows.retrain"]


def test_the_command_line_starts_without_torch():
    """DVC's stage commands (`mmim extract`, `mmim data synth`) and `mmim --help` start in well
    under a second: only the commands that train or predict import torch and transformers' models."""
    probe = "import sys, mmim.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- how many modules a module needs

# Entry points parse, call and render: they import what their commands need.
ENTRY_POINTS = {"mmim/cli.py", "mmim/cli_parser.py", "mmim/__init__.py"}
# What every layer may use without it being a dependency worth counting: exceptions, size
# limits, atomic writes, the one way to reach a Ray cluster and Ray's trainer as we start it
# (each imports nothing of the project but the exceptions).
LEAVES = {"mmim.core.errors", "mmim.core.limits", "mmim.core.files", "mmim.cluster.connect", "mmim.cluster.placement"}
MAX_PROJECT_IMPORTS = 7


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports (at the top, in functions, for type checking alike):
    `from mmim.registry import versions` counts as mmim.registry.versions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mmim"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmim":
            for alias in node.names:
                submodule = PROJECT / f"{node.module}.{alias.name}".replace(".", "/")
                is_module = submodule.with_suffix(".py").is_file() or submodule.is_dir()
                names.add(f"{node.module}.{alias.name}" if is_module else node.module)
    own = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
    return names - {own, own.removesuffix(".__init__")} - LEAVES


LIBRARY = sorted(
    str(path.relative_to(PROJECT)) for path in (PROJECT / "mmim").rglob("*.py") if path.name != "__main__.py"
)


def test_no_library_module_is_a_hub():
    """A module that needs many others is where a change anywhere ripples to: it should be split."""
    counts = {module: project_imports(PROJECT / module) for module in LIBRARY if module not in ENTRY_POINTS}
    hubs = {module: sorted(names) for module, names in counts.items() if len(names) > MAX_PROJECT_IMPORTS}
    assert not hubs, f"more than {MAX_PROJECT_IMPORTS} project modules imported: {hubs}"
    assert len(counts) > 40 and max(len(names) for names in counts.values()) >= 5  # it counts what it should


def test_the_import_count_sees_every_form_of_import():
    probe = project_imports(PROJECT / "mmim" / "lifecycle" / "registration.py")
    assert {"mmim.registry.versions", "mmim.registry.scoring", "mmim.core.config"} <= probe
    assert len(project_imports(PROJECT / "mmim" / "cli.py")) > MAX_PROJECT_IMPORTS  # entry points are exempt


@pytest.mark.parametrize("entry, limit", [("mmim/cli.py", 400), ("flows/retrain.py", 250)])
def test_entry_points_stay_thin(entry, limit):
    lines = len((PROJECT / entry).read_text().splitlines())
    assert lines <= limit, f"{entry}: {lines} lines; parsing, calling and rendering fit in {limit}"
