"""The two-stage engine: which parameters each stage steps, selection, determinism, resuming."""

import contextlib
import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import mmim
from mmim.cluster.distributed import load_training_state, save_training_state
from mmim.core.batches import make_loader
from mmim.core.errors import TrainingDiverged
from mmim.core.files import read_json
from mmim.core.model import MMIM, build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import load_tokenizer
from mmim.data.store_writer import write_store
from mmim.data.synthetic import synthesize
from mmim.training.checkpoint import load_weights
from mmim.training.engine import (
    Engine,
    EpochRecord,
    Loaders,
    ModelSelection,
    StageTotals,
    TrainingHooks,
    bf16_instructions,
    evaluate,
    fit,
    seed_everything,
    split_parameters,
)
from mmim.training.predict import evaluate_checkpoint
from mmim.training.train import setup_training, train
from tests.helpers import TINY_SIZES

BF16_TOLERANCE = 0.01  # absolute, on the loss and MAE (about 1 after one epoch); measured: about 1e-3


def make_engine(config, **train_overrides):
    store = FeatureStore(config.data.store)
    config = bind_store(config, store)
    seed_everything(0)
    engine = Engine(build_model(config.model), config.train.model_copy(update=train_overrides))
    return engine, store


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


def test_stage0_steps_only_mmilb_and_stage1_never_mmilb(tiny_config):
    engine, store = make_engine(tiny_config)
    groups = split_parameters(engine.core)
    loader = make_loader(store["train"], 16, shuffle=True, seed=1)
    before = {name: snapshot(params) for name, params in groups.items()}
    stats = engine.train_stage0(loader)
    names = [n for n, p in engine.core.named_parameters() if n.startswith("mi_")]
    moved = dict(zip(names, changed(before["mmilb"], groups["mmilb"])))
    # lld trains the Gaussian MLPs; the entropy projection only gets gradients in stage 1
    assert all(v for n, v in moved.items() if "entropy_prj" not in n)
    assert not any(v for n, v in moved.items() if "entropy_prj" in n)
    assert not any(changed(before["bert"], groups["bert"]) + changed(before["main"], groups["main"]))
    assert math.isfinite(stats["neg_lld"])

    before = {name: snapshot(params) for name, params in groups.items()}
    stats = engine.train_stage1(loader)
    assert not any(changed(before["mmilb"], groups["mmilb"]))
    assert any(changed(before["bert"], groups["bert"])) and any(changed(before["main"], groups["main"]))
    assert all(math.isfinite(v) for v in stats.values()) and stats["H"] != 0.0


def test_fast_and_official_stage0_give_the_same_mmilb_update_without_clipping(tiny_config):
    """Parity of the two stage-0 modes: identical MMILB updates when clipping is inactive.

    With clipping active they differ by design: the official norm includes encoder gradients.
    """
    results = {}
    for mode in ("fast", "official"):
        engine, store = make_engine(tiny_config, stage0_mode=mode, clip=1e9)
        loader = make_loader(store["train"], 16, shuffle=False)
        engine.train_stage0([next(iter(loader))])
        encoder_grads = [p.grad for p in split_parameters(engine.core)["bert"]]
        results[mode] = (snapshot(split_parameters(engine.core)["mmilb"]), encoder_grads)
    for fast, official in zip(results["fast"][0], results["official"][0]):
        torch.testing.assert_close(fast, official, rtol=1e-5, atol=1e-6)
    assert all(g is None for g in results["fast"][1])  # fast mode records no encoder graph
    assert any(g is not None for g in results["official"][1])


def stage1_read_every_batch(engine, batches):
    """Stage 1 as the engine ran it before its sums stayed on the device: every figure read per batch."""
    config, totals, count, memory = engine.config, Counter(), 0, None
    engine.model.train()
    for index, batch in enumerate(batches):
        engine.core.zero_grad(set_to_none=True)
        output = engine.model(**batch.model_inputs(), labels=batch.labels, memory=memory if index > 1 else None)
        task = engine.l1(output.score, batch.labels)
        loss = task + config.alpha * output.nce - config.beta * output.lld - config.beta * output.entropy
        engine._step(loss, engine.optimizer_main)
        memory = output.memory
        figures = {"loss": loss, "task": task, "nce": output.nce, "lld": output.lld, "H": output.entropy}
        for name, value in figures.items():
            totals[name] += value.item() * len(batch)
        count += len(batch)
    return {name: total / count for name, total in totals.items()}


def test_stage_means_kept_on_the_device_equal_reading_every_batch(tiny_config):
    batches = list(make_loader(FeatureStore(tiny_config.data.store)["train"], 16, shuffle=False))
    kept = make_engine(tiny_config)[0].train_stage1(batches)
    read = stage1_read_every_batch(make_engine(tiny_config)[0], batches)
    assert kept == read and read["H"] != 0.0


HOST_READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")
CALLERS = tuple(str(Path(package.__file__).parent) for package in (mmim, transformers))


def count_host_reads_by_mmim(monkeypatch) -> Counter:
    """Count what mmim's code, and transformers' under it, do that makes a host wait for a GPU:
    reading a tensor's value, and selecting rows by a boolean mask (its size must come back)."""
    counts: Counter = Counter()

    def from_mmim() -> bool:  # or from transformers, which mmim calls per batch
        caller = sys._getframe(2).f_code.co_filename
        return caller.startswith(CALLERS)

    for name in HOST_READS:

        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            counts[_name] += from_mmim()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def getitem(self, key, _original=torch.Tensor.__getitem__):
        counts["mask"] += isinstance(key, torch.Tensor) and key.dtype == torch.bool and from_mmim()
        return _original(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return counts


def test_training_steps_read_nothing_back_until_the_stage_ends(tiny_config, monkeypatch):
    """No .item()/.cpu()/mask selection per batch: a stage of 6 batches reads what one of 2 reads."""
    engine, store = make_engine(tiny_config)
    batches = list(make_loader(store["train"], 16, shuffle=False))
    counts = count_host_reads_by_mmim(monkeypatch)
    reads = []
    for many in (2, 6):
        counts.clear()
        engine.train_stage0(batches[:many])
        engine.train_stage1(batches[:many])
        reads.append(dict(counts))
    assert reads[0] == reads[1], reads
    assert sum(reads[0].values()) > 0  # the counting works: the stage ends do read


def test_a_non_finite_loss_is_reported_at_the_stage_end_naming_its_first_batch():
    totals = StageTotals(torch.device("cpu"))
    for index, loss in enumerate([0.5, 0.4, math.nan, 0.3, math.inf]):
        totals.add(index, 2, torch.tensor(loss))
    with pytest.raises(TrainingDiverged, match=r"epoch 3, stage 1, batch 3: loss is nan \(lower the learning"):
        totals.close(epoch=3, stage=1)
    finite = StageTotals(torch.device("cpu"))
    finite.add(0, 2, torch.tensor(1.0), task=torch.tensor(2.0))
    finite.add(1, 6, torch.tensor(3.0), task=torch.tensor(2.0))
    assert finite.close(1, 1) == {"loss": 2.5, "task": 2.0}  # weighted by batch size
    assert StageTotals(torch.device("cpu")).close(1, 0) == {}  # a stage without batches


def output_dtypes(model) -> dict:
    """Record the dtype of what each part of the model returns (or, for BERT, computes inside)."""
    seen: dict[str, set] = {}
    parts = {"bert's matmuls": model.text_enc.bertmodel.encoder.layer[0].attention.self.query}
    parts |= {name: getattr(model, name) for name in ("acoustic_enc", "visual_enc", "mi_tv", "mi_ta", "cpc_zt")}
    parts |= {"fusion": model.fusion_prj}
    for name, module in parts.items():

        def record(_module, _inputs, output, name=name):
            tensors = output if isinstance(output, tuple) else (output,)
            seen.setdefault(name, set()).update(t.dtype for t in tensors if isinstance(t, torch.Tensor))

        module.register_forward_hook(record)
    return seen


def test_one_bf16_epoch_trains_bert_in_bf16_the_rest_in_fp32_finite_and_close_to_fp32(tiny_config, caplog):
    """bf16 autocast of the text encoder only: the LSTMs, MMILB, CPC, fusion, covariance/logdet
    and the losses stay fp32. Where the CPU has no bf16 instructions the run says so and keeps fp32."""
    store = FeatureStore(tiny_config.data.store)
    records, dtypes = {}, {}
    for bf16 in (False, True):
        engine, _ = make_engine(tiny_config, bf16=bf16)
        dtypes[bf16] = output_dtypes(engine.core)
        loaders = [make_loader(store[split], 16, shuffle=False) for split in ("train", "valid", "test")]
        records[bf16] = engine.run_epoch(1, *loaders)
    fp32, bf16 = records[False], records[True]
    figures = [*bf16.stage0.values(), *bf16.stage1.values(), *bf16.valid.values()]
    assert all(math.isfinite(v) for v in figures) and bf16.stage1["H"] != 0.0  # the logdet terms ran, finite
    assert all(seen == {torch.float32} for seen in dtypes[False].values()), dtypes[False]
    if not bf16_instructions(torch.device("cpu")):
        assert dtypes[True] == dtypes[False] and "no bf16 instructions" in caplog.text
        return
    assert dtypes[True].pop("bert's matmuls") == {torch.bfloat16}
    assert all(seen == {torch.float32} for seen in dtypes[True].values()), dtypes[True]
    assert bf16.stage1 != fp32.stage1  # autocast did run
    # One epoch apart by bf16 rounding only (8 bits of mantissa).
    assert abs(bf16.stage1["loss"] - fp32.stage1["loss"]) < BF16_TOLERANCE
    assert abs(bf16.valid["MAE"] - fp32.valid["MAE"]) < BF16_TOLERANCE


def test_bf16_on_a_cpu_without_bf16_instructions_says_so_and_trains_in_fp32(tiny_config, monkeypatch, caplog):
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # as torch reports an older CPU
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    engine, _ = make_engine(tiny_config, bf16=True, device="cpu")
    assert engine.core.bf16 is False
    assert "train.bf16: this CPU has no bf16 instructions" in caplog.text and "training in fp32" in caplog.text


class WeightCasts(TorchDispatchMode):
    """Counts casts of the model's parameters to bf16 (autocast's; a cached cast is not one)."""

    def __init__(self, model):
        super().__init__()
        self.parameters = {parameter.data_ptr() for parameter in model.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.count += args[0].data_ptr() in self.parameters
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["fast", "official"])
def test_stage0_and_evaluation_cast_the_bf16_weights_once_and_train_exactly_as_casting_every_batch(
    tiny_config, monkeypatch, mode
):
    store = FeatureStore(tiny_config.data.store)
    loaders = [make_loader(store[split], 16, shuffle=False) for split in ("train", "valid", "test")]

    def bf16_epoch():
        engine, _ = make_engine(tiny_config, stage0_mode=mode)
        engine.core.bf16 = True  # also where the CPU would emulate bf16
        with WeightCasts(engine.core) as casts:
            evaluate(engine.core, loaders[1], engine.device)  # 2 batches
        return engine.run_epoch(1, *loaders), snapshot(engine.core.parameters()), casts.count

    once, once_weights, once_casts = bf16_epoch()
    monkeypatch.setattr(MMIM, "reusing_bf16_weights", lambda self: contextlib.nullcontext())
    every_batch, every_batch_weights, every_batch_casts = bf16_epoch()
    assert once_casts > 0 and every_batch_casts == 2 * once_casts
    assert (once.stage0, once.stage1, once.valid, once.test) == (
        every_batch.stage0,
        every_batch.stage1,
        every_batch.valid,
        every_batch.test,
    )
    assert all(torch.equal(a, b) for a, b in zip(once_weights, every_batch_weights))


def test_stage0_fraction_uses_the_first_share_of_batches(tiny_config):
    engine, store = make_engine(tiny_config, stage0_fraction=0.5)
    loader = make_loader(store["train"], 16, shuffle=False)  # 96 examples -> 6 batches

    class Count(TrainingHooks):
        planned = done = 0

        def on_stage_start(self, epoch, stage, batches):
            self.planned = batches

        def on_batch_end(self, epoch, stage):
            self.done += 1

    hooks = Count()
    engine.train_stage0(loader, hooks=hooks)
    assert hooks.planned == hooks.done == 3


def test_stage1_stays_finite_when_one_label_group_is_empty(tiny_config, tiny_encoder, tmp_path):
    splits = synthesize(0, TINY_SIZES)
    for split in splits.values():  # every label positive: the negative group is always empty
        split.labels = np.minimum(np.abs(split.labels) + 0.1, 3.0)
    summary = write_store(
        tmp_path / "positive",
        splits,
        load_tokenizer(tiny_encoder),
        text_encoder=tiny_encoder,
        max_tokens=50,
        source="test",
    )
    config = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"store": str(summary.root)})})
    engine, store = make_engine(config)
    stats = engine.train_stage1(make_loader(store["train"], 16, shuffle=True))
    assert all(math.isfinite(v) for v in stats.values())


class ScriptedEngine:
    """Replays given validation/test losses so that fit's selection logic can be checked."""

    def __init__(self, config, valid_losses, test_losses):
        self.config, self.valid, self.test = config, valid_losses, test_losses

    def run_epoch(self, epoch, *loaders, hooks=None):
        v, t = self.valid[epoch - 1], self.test[epoch - 1]
        return EpochRecord(epoch, {}, {"loss": v}, {}, {"loss": v, "MAE": v}, {"loss": t, "MAE": t}, 0.0)


def test_selection_on_validation_only_and_early_stopping(tiny_config):
    config = tiny_config.train.model_copy(update={"epochs": 10, "patience": 2})
    engine = ScriptedEngine(config, valid_losses=[0.9, 0.7, 0.8, 0.75, 0.6], test_losses=[0.9, 0.8, 0.5, 0.4, 0.3])
    result = fit(engine, Loaders(SimpleNamespace(sampler=None), None, None))
    # epochs 3 and 4 do not beat 0.7: patience 2 runs out after epoch 4, before 0.6 is seen
    assert result.stopped_early and len(result.history) == 4
    assert result.best.epoch == 2
    assert result.best.test["MAE"] == 0.8  # the test figure of the selected epoch, not the best test


def test_seeded_training_is_bit_identical_and_keeps_the_selected_epoch(baseline_training, tiny_config):
    first, second = baseline_training, train(tiny_config)  # the same settings and seed, run again
    weights_a, weights_b = (load_file(str(run.checkpoint / "model.safetensors")) for run in (first, second))
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in run.epochs] for run in (first, second)]
    assert untimed[0] == untimed[1]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # the checkpoint holds the selected epoch's weights: they score what that epoch reported
    assert read_json(first.checkpoint / "metrics.json")["epoch"] == first.best_epoch
    scored = evaluate_checkpoint(first.checkpoint, tiny_config.data.store)
    assert scored["valid"]["MAE"] == pytest.approx(first.best["valid_MAE"], abs=1e-6)
    assert scored["test"]["MAE"] == pytest.approx(first.best["test_MAE"], abs=1e-6)


class SaveAfter(TrainingHooks):
    """What a Ray worker writes after an epoch: weights plus resume state (here after epoch 1 only)."""

    def __init__(self, training, selection, directory):
        self.training, self.selection, self.directory = training, selection, directory

    def on_epoch_end(self, record, improved):
        if record.epoch == 1:
            self.training.save_checkpoint(self.directory, record)
            save_training_state(self.directory, self.training.engine, self.selection, record.epoch)


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 3})})
    store = FeatureStore(config.data.store)
    whole = setup_training(config, store)
    selection = ModelSelection(config.train.patience)
    uninterrupted = fit(
        whole.engine, whole.loaders, SaveAfter(whole, selection, tmp_path / "epoch1"), selection=selection
    )

    resumed = setup_training(config, store)  # a fresh process: new model, optimizers, scheduler
    restored = ModelSelection(config.train.patience)
    load_weights(tmp_path / "epoch1", resumed.model)
    assert load_training_state(tmp_path / "epoch1", resumed.engine, restored) == 1
    rest = fit(resumed.engine, resumed.loaders, selection=restored, start_epoch=2)

    assert [r.epoch for r in rest.history] == [2, 3]
    assert [r.stage1 for r in rest.history] == [r.stage1 for r in uninterrupted.history[1:]]
    assert [r.valid for r in rest.history] == [r.valid for r in uninterrupted.history[1:]]
    assert resumed.engine.learning_rates() == whole.engine.learning_rates()
    assert rest.best.epoch == uninterrupted.best.epoch
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
