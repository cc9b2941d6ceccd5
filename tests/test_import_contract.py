"""The import contract: flows -> tasks -> mmim, and the core loads no service library.

Each module is imported in a fresh process, which then lists the packages it pulled in;
an edge that runs sideways (the core importing Ray, `mmim predict` loading DVC, the flow
loading Ray at import) shows up here as a package that should not be there.
"""

import json
import subprocess
import sys

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
)

# module -> what importing it must not load. A module's imports are checked with it: mmim.training.train
# imports the whole core (asserted below), mmim.training.predict the checkpoint, flows.retrain every task.
CONTRACT = {
    # the core and the single-process training on it
    "mmim.training.train": SERVICES,
    # inference: predictions and the checkpoint never pull in training
    "mmim.training.predict": SERVICES + TRAINING,
    # serving is MLflow's, and nothing else's
    "mmim.registry.serving": ("ray", "dvc", "prefect", "matplotlib") + TRAINING,
    # `mmim predict`, `mmim --help`: adapters load when a command needs them
    "mmim.cli": SERVICES + ("mmim.cluster.distributed", "mmim.registry.tracking", "mmim.data.versioning"),
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
# child per module: each child starts from that state, imports its module and lists sys.modules.
PROBE = """
import importlib, json, os, sys
import numpy, pydantic, rich, safetensors, torch, torch.nn.parallel, torch.utils.data, yaml  # allowed
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel  # in every layer
assert not {"ray", "mlflow", "dvc", "prefect", "matplotlib", "botocore", "mmim"} & set(sys.modules)
loaded = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        importlib.import_module(module)
        with os.fdopen(write, "w") as pipe:
            json.dump(sorted(sys.modules), pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        loaded[module] = json.load(pipe)
    os.wait()
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
