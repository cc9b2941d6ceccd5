"""Gating and people: a person's choice of `champion` stands until a newer challenger beats it,
and every move of the alias is recorded. MLflow's registry on a sqlite file (what `make demo` uses)."""

import getpass

import mlflow
import pytest

from mmim.registry.versions import champion_moves, promote, register, rollback
from tests.helpers import compared

NAME = "mmim-gating"
DATA = "v1.dir"


@pytest.fixture
def client(mlflow_sqlite, tmp_path):
    # artifacts (the external models' metadata) in the test's directory, not ./mlruns
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("gating", str(tmp_path / "artifacts")))
    return mlflow_sqlite


def registered(client, value):
    """A new version with validation MAE `value` (a model without files: gating only reads tags)."""
    model = f"models:/{mlflow.create_external_model(name='candidate').model_id}"
    return register(client, model, NAME, compared(client, value, DATA, NAME))


def champion(client):
    return str(client.get_model_version_by_alias(NAME, "champion").version)  # sqlite: int


def test_a_persons_choice_stands_until_a_newer_challenger_beats_it(client):
    assert registered(client, 0.5).promoted and registered(client, 0.3).promoted  # v1, then v2
    promote(client, NAME, "1")  # a person prefers v1, knowing v2's figure
    third = registered(client, 0.6)  # v3: worse than v1; v2 (older than the choice) must not come back
    assert champion(client) == "1" and not third.promoted
    assert third.text == (
        f"kept champion v1, chosen by {getpass.getuser()}: MAE 0.6000 does not beat its 0.5000 "
        f"on data {DATA} by margin 0.0"
    )
    fourth = registered(client, 0.45)  # v4 beats the chosen champion: gating moves on, to v4, not v2
    assert fourth.promoted and champion(client) == "4"
    assert rollback(client, NAME) == "1" and champion(client) == "1"  # back to the person's choice
    moves = champion_moves(client, NAME)
    assert [move.split(":")[0] for move in moves] == [
        "v1 by gating",
        "v2 by gating",
        "v1 by person",
        "v4 by gating",
        "v1 by person",
    ]
    assert moves[3] == f"v4 by gating: MAE 0.4500 beats v1's 0.5000 on data {DATA}"
    tags = client.get_registered_model(NAME).tags
    assert tags["champion_set_by"] == f"person:{getpass.getuser()}" and int(tags["champion_set_at"]) > 0
