"""Gating head to head, against a real `mlflow server` (sqlite) on 127.0.0.1, as the flow's
evaluate and register steps do it (mmim.registry.tracking.compare_with_champion, mmim.registry.versions.register).

The models are real checkpoints whose score is a constant (the last layer's weights zeroed,
its bias set), so every figure below is known in advance: a constant c scores
MAE = mean |label - c| on any split. The data versions differ only in their validation labels.
"""

import io
import json
import re
import shutil
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console
from transformers import BertTokenizer

from mmim.cli import main
from mmim.core.model import build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import load_tokenizer
from mmim.data.store_writer import write_store
from mmim.data.synthetic import synthesize
from mmim.registry.gating import paired_bootstrap
from mmim.registry.logged_model import PYFUNC_ENTRY
from mmim.registry.scoring import compare_with_champion
from mmim.registry.versions import champion_version, describe, figure, promote, register
from mmim.tables import registry_table
from mmim.training.checkpoint import save_checkpoint
from tests.helpers import TINY_SIZES, compared, start_mlflow_server

LONG_VERSION = "b18a22a3b9effafe5e7a9b919ea4b276.dir"  # as DVC names a store: the registry table folds it
BASE = np.linspace(-0.5, 0.5, TINY_SIZES["valid"])  # validation labels of data v1: MAE of 0 is 0.2581


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tracking server for the module; every test registers its own model name."""
    root = tmp_path_factory.mktemp("gating")
    process, uri = start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("gating")
        yield MlflowClient(uri)
        mlflow.set_tracking_uri(None)
    process.terminate()
    process.wait(timeout=30)


def data(root: Path, encoder: str, valid_labels) -> Path:
    """A store whose validation labels are `valid_labels` (train and test as synthesized)."""
    splits = synthesize(0, TINY_SIZES)
    splits["valid"].labels = np.asarray(valid_labels, dtype=np.float32)
    return write_store(
        root, splits, load_tokenizer(encoder), text_encoder=encoder, max_tokens=16, source="synthetic"
    ).root


class Constant:
    """A logged model (an MLflow run with the pyfunc model) whose every score is `value`."""

    def __init__(self, config, store: Path, value: float, where: Path):
        config = bind_store(
            config.model_copy(update={"data": config.data.model_copy(update={"store": str(store)})}),
            FeatureStore(store),
        )
        model = build_model(config.model).eval()
        with torch.no_grad():
            model.fusion_prj.linear_3.weight.zero_()
            model.fusion_prj.linear_3.bias.fill_(value)
        self.config, self.checkpoint = (
            config,
            save_checkpoint(where, model, config, load_tokenizer(config.model.text_encoder)),
        )
        with mlflow.start_run() as run:
            self.run_id = run.info.run_id
            self.uri = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_ENTRY),
                artifacts={"checkpoint": str(self.checkpoint)},
                pip_requirements=["mmim-pipeline"],
            ).model_uri


def gate(client, name, model: Constant, store: Path, data_version: str, min_confidence=None):
    """The flow's evaluate then register steps for `model`, on `store` (data version `data_version`)."""
    tracking = model.config.tracking.model_copy(update={"min_confidence": min_confidence})
    config = model.config.model_copy(update={"tracking": tracking})
    compared = compare_with_champion(
        config, model.run_id, model.checkpoint, store, data_version, name, champion_version(client, name)
    )
    return compared, register(client, model.uri, name, compared, 0.0, min_confidence)


def mae(labels, constant):
    return float(np.mean(np.abs(np.asarray(labels, dtype=np.float32) - np.float32(constant))))


@pytest.mark.service
def test_the_gate_compares_both_models_on_the_new_data(server, tiny_config, tmp_path):
    client, name, encoder = server, "mmim-head-to-head", tiny_config.model.text_encoder
    v1 = data(tmp_path / "v1", encoder, BASE)
    v2 = data(tmp_path / "v2", encoder, BASE + 2.0)  # a much harder validation split
    v3 = data(tmp_path / "v3", encoder, BASE + 1.5)
    a, b, c = (Constant(tiny_config, v1, value, tmp_path / f"model-{value}") for value in (0.0, 1.5, 1.2))

    _, first = gate(client, name, a, v1, "v1.dir")
    assert (
        first.promoted
        and first.text == f"promoted to champion: MAE {mae(BASE, 0):.4f} on data v1.dir, no champion before"
    )

    # B on v2 scores worse than A's figure recorded on v1, but beats A on v2: promoted
    compared, second = gate(client, name, b, v2, "v2.dir")
    assert compared.challenger_value > figure(client.get_model_version(name, first.version), "MAE", "v1.dir")
    assert compared.champion_value == pytest.approx(mae(BASE + 2, 0), abs=1e-6)
    assert second.promoted and champion_version(client, name) == second.version
    assert second.text.startswith(
        f"promoted to champion: MAE {mae(BASE + 2, 1.5):.4f} beats v{first.version}'s "
        f"{mae(BASE + 2, 0):.4f} on data v2.dir (improvement +1."
    )
    # both figures, the data and the champion compared: on the run and on the new version
    tags = client.get_model_version(name, second.version).tags
    assert tags["gate.champion"] == f"v{first.version}" and tags["gate.data_version"] == "v2.dir"
    assert float(tags["gate.champion_valid_MAE"]) == compared.champion_value
    assert float(tags["valid_MAE/v2.dir"]) == compared.challenger_value and "valid_MAE/v1.dir" not in tags
    run = client.get_run(b.run_id).data
    assert run.tags["gate.champion"] == f"v{first.version}" and run.tags["gate.data_version"] == "v2.dir"
    assert run.metrics["champion_valid_MAE"] == pytest.approx(compared.champion_value)
    assert run.metrics["eval_valid_MAE"] == pytest.approx(compared.challenger_value)
    assert figure(client.get_model_version(name, first.version), "MAE", "v2.dir") == compared.champion_value

    # the reverse: C on v3 scores better than B's figure recorded on v2, but loses to B on v3
    compared, third = gate(client, name, c, v3, "v3.dir")
    assert compared.challenger_value < figure(client.get_model_version(name, second.version), "MAE", "v2.dir")
    assert not third.promoted and champion_version(client, name) == second.version
    assert third.text == (
        f"kept champion v{second.version}: MAE {mae(BASE + 1.5, 1.2):.4f} does not beat its "
        f"{mae(BASE + 1.5, 1.5):.4f} on data v3.dir by margin 0.0"
    )
    assert third.needs_review is None


@pytest.mark.service
def test_a_champion_that_cannot_be_scored_is_kept_and_the_new_version_needs_review(server, tiny_config, tmp_path):
    client, name = server, "mmim-other-tokenizer"
    other = tmp_path / "other-bert"  # another vocabulary, another tokenizer
    shutil.copytree(tiny_config.model.text_encoder, other)
    words = (other / "vocab.txt").read_text().split()
    (other / "vocab.txt").write_text("\n".join(words[:5] + words[5:][::-1]) + "\n")
    BertTokenizer(str(other / "vocab.txt")).save_pretrained(other)
    old = Constant(
        tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"text_encoder": str(other)})}),
        data(tmp_path / "old", str(other), BASE),
        0.0,
        tmp_path / "old-model",
    )
    _, first = gate(client, name, old, Path(old.config.data.store), "old.dir")
    assert first.promoted

    store = data(tmp_path / "new", tiny_config.model.text_encoder, BASE)
    new = Constant(tiny_config, store, 0.2, tmp_path / "new-model")
    compared, second = gate(client, name, new, store, "new.dir")
    assert compared.champion is None and "does not match the tokenizer" in compared.unscorable
    assert not second.promoted and champion_version(client, name) == first.version
    assert second.needs_review.startswith(
        f"champion v{first.version} cannot be scored on data new.dir: model.text_encoder {str(other)!r} does not match"
    )
    assert second.text == f"kept champion v{first.version}: needs review: {second.needs_review}"
    tags = client.get_model_version(name, second.version).tags
    assert tags["needs_review"] == second.needs_review and tags["gate.champion"] == f"v{first.version}"
    promote(client, name, second.version)  # a person decides
    assert champion_version(client, name) == second.version


@pytest.mark.service
def test_min_confidence_promotes_a_clear_improvement_not_a_noisy_one(server, tiny_config, tmp_path):
    client, name, encoder = server, "mmim-confidence", tiny_config.model.text_encoder
    signs = np.where(np.arange(TINY_SIZES["valid"]) < 17, 1.0, -1.0)  # 17 positive, 15 negative
    noisy = data(tmp_path / "noisy", encoder, signs)
    clear = data(tmp_path / "clear", encoder, 1.0 + BASE / 2)
    champion = Constant(tiny_config, noisy, 0.0, tmp_path / "champion")
    assert gate(client, name, champion, noisy, "noisy.dir", 0.95)[1].promoted

    # 0.05 towards the positive labels: better on 17 utterances, worse on 15
    compared, tiny = gate(client, name, Constant(tiny_config, noisy, 0.05, tmp_path / "tiny"), noisy, "noisy.dir", 0.95)
    bootstrap = compared.bootstrap
    assert compared.challenger_value < compared.champion_value  # the margin rule alone would promote it
    assert bootstrap.improvement == pytest.approx(0.05 * 2 / 32, abs=1e-6) and bootstrap.low < 0 < bootstrap.high
    assert not tiny.promoted and champion_version(client, name) == "1"
    assert "does not lie above zero (min_confidence 0.95)" in tiny.text
    assert client.get_model_version(name, tiny.version).tags["gate.confidence"] == "0.95"

    compared, better = gate(
        client, name, Constant(tiny_config, clear, 1.0, tmp_path / "clear-model"), clear, "clear.dir", 0.95
    )
    assert compared.bootstrap.low > 0.5 and better.promoted
    assert "95% interval +0." in better.text


@pytest.mark.service
def test_concurrent_registrations_leave_the_best_champion(server, tiny_config, tmp_path, capsys):
    client, name = server, "mmim-concurrent"
    base = Constant(tiny_config, Path(tiny_config.data.store), 0.0, tmp_path / "base")
    gate(client, name, base, Path(tiny_config.data.store), LONG_VERSION)
    # two runs finishing together, several times over, each having scored the champion it
    # found on the same data: values far better than the first run's. Each stands for
    # another run's model (a model without files: gating only reads tags).
    for round_values in ([0.30, 0.20], [0.10, 0.15], [0.12, 0.05]):
        outcomes, errors, seen = [], [], []
        models = [f"models:/{mlflow.create_external_model(name='candidate').model_id}" for _ in round_values]
        both_scored = threading.Barrier(len(round_values), timeout=60)

        def finish(model_uri, value):
            try:
                client = MlflowClient(mlflow.get_tracking_uri())
                head_to_head = compared(client, value, LONG_VERSION, name)
                seen.append(head_to_head.champion_version)
                both_scored.wait()  # each has read the same champion; now both register at once
                outcomes.append(register(client, model_uri, name, head_to_head))
            except Exception as error:  # handed to the test thread
                errors.append(error)

        threads = [threading.Thread(target=finish, args=pair) for pair in zip(models, round_values)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and len(outcomes) == 2
        assert len(set(seen)) == 1  # both were gated against the same champion: the race is real
    champion = client.get_model_version_by_alias(name, "champion")
    assert figure(champion, "MAE", LONG_VERSION) == 0.05  # the best of everything registered
    assert len(describe(client, name)) == 7
    # the same model registered again (a retried step) keeps its version
    assert register(client, models[-1], name, compared(client, 0.05, LONG_VERSION, name)).version == champion.version
    assert len(describe(client, name)) == 7
    capsys.readouterr()  # what registering printed
    assert main(["registry", "list", "--name", name, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)  # every value whole
    assert listed == json.loads(json.dumps(describe(client, name)))
    # readable at 80 columns: versions and aliases whole, a line per version
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(registry_table(name, describe(client, name)))
    table = console.export_text()
    assert max(len(line) for line in table.splitlines()) <= 80
    for row in describe(client, name):
        assert re.search(rf"│ +{row['version']} │ {re.escape(row['aliases'])} +│", table), row


@pytest.mark.service
def test_gating_on_corr_needs_a_higher_figure_by_more_than_the_margin(server, tiny_config):
    client, name, data = server, "mmim-corr", "corr.dir"
    tracking = tiny_config.tracking.model_copy(update={"metric": "Corr", "margin": 0.05})

    def registered(value):
        """A new version with validation Corr `value` on `data`, gated as the flow's register step does."""
        model = f"models:/{mlflow.create_external_model(name='candidate').model_id}"
        head_to_head = compared(client, value, data, name, metric=tracking.metric)
        return register(client, model, name, head_to_head, tracking.margin, tracking.min_confidence)

    first = registered(0.60)
    assert first.promoted
    lower = registered(0.40)  # a lower Corr is worse (with MAE, lower is better)
    assert not lower.promoted and champion_version(client, name) == first.version
    within = registered(0.64)  # higher, but by less than the margin
    assert not within.promoted and champion_version(client, name) == first.version
    assert within.text == (
        f"kept champion v{first.version}: Corr 0.6400 does not beat its 0.6000 on data {data} by margin 0.05"
    )
    beyond = registered(0.66)  # higher by more than the margin
    assert beyond.promoted and champion_version(client, name) == beyond.version
    assert beyond.text == f"promoted to champion: Corr 0.6600 beats v{first.version}'s 0.6000 on data {data}"
    tags = client.get_model_version(name, beyond.version).tags
    assert float(tags[f"valid_Corr/{data}"]) == 0.66 and f"valid_MAE/{data}" not in tags


def test_the_paired_bootstrap_on_a_case_worked_by_hand():
    """Two utterances, labels 0. The champion misses by 1 and 3, the challenger by 0: per-utterance
    gains 1 and 3, improvement 2. A resample of 2 draws has mean gain 1 (p 1/4), 2 (1/2) or 3 (1/4),
    so the 95% interval runs from 1 to 3."""
    truths, champion, challenger = np.zeros(2), np.array([1.0, -3.0]), np.zeros(2)
    bootstrap = paired_bootstrap(truths, champion, challenger, "MAE", resamples=1000)
    assert (bootstrap.improvement, bootstrap.low, bootstrap.high) == (2.0, 1.0, 3.0)
    assert bootstrap == paired_bootstrap(truths, champion, challenger, "MAE", resamples=1000)  # seeded
    # paired: the same draws for both models. Errors of 1 to 5 and of 0.75 to 4.75 differ widely
    # from one utterance to the next, but the gain is 0.25 on each, so it has no spread at all
    errors = np.arange(1.0, 6.0)
    uniform = paired_bootstrap(np.zeros(5), errors, errors - 0.25, "MAE")
    assert (uniform.improvement, uniform.low, uniform.high) == (0.25, 0.25, 0.25)


def test_a_challenger_trained_once_per_seed_is_gated_on_the_seeds_mean():
    """By hand: labels 1, 2, 3. The champion scores 3, 2, 1 (Corr -1, MAE 4/3); seed A scores
    1, 2, 3 (Corr 1, MAE 0), seed B 3, 2, 1 (Corr -1, MAE 4/3). On the seeds' mean: Corr 0, an
    improvement of 1; MAE 2/3, an improvement of 2/3. Seed A alone would improve by 2 and 4/3."""
    truths, champion = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    seeds = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert paired_bootstrap(truths, champion, seeds, "Corr").improvement == pytest.approx(1.0)
    assert paired_bootstrap(truths, champion, seeds, "MAE").improvement == pytest.approx(2 / 3)
    assert paired_bootstrap(truths, champion, seeds[0], "Corr").improvement == pytest.approx(2.0)
    assert paired_bootstrap(truths, champion, seeds[:1], "MAE").improvement == pytest.approx(4 / 3)
