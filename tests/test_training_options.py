"""Training options beyond the defaults, on the tiny encoder and store: contrast off, deeper
LSTMs and CPC heads, RMSprop, and the learning-rate decay on the validation loss."""

import math

import pytest
import torch

from mmim.core.batches import make_loader
from mmim.core.model import build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.training.engine import Engine, seed_everything, stage1_loss


def setup(config, model=None, **train):
    """(engine, (train, valid, test) batches) for `config` with `model`/`train` settings changed:
    the first 4 training batches (H enters the loss from the third) and one batch to evaluate."""
    store = FeatureStore(config.data.store)
    config = bind_store(config, store)
    config = config.model_copy(
        update={"model": config.model.model_copy(update=model or {}), "train": config.train.model_copy(update=train)}
    )
    seed_everything(0)
    engine = Engine(build_model(config.model), config.train)
    batch = config.train.batch_size
    loaders = (
        list(make_loader(store["train"], batch, shuffle=True, seed=1))[:4],
        list(make_loader(store["valid"], batch, shuffle=False))[:1],
        list(make_loader(store["test"], batch, shuffle=False))[:1],
    )
    return engine, loaders


def mmilb_parameters(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.core.named_parameters() if name.startswith("mi_")}


def group_of(optimizer, parameter) -> dict:
    """The parameter group of `optimizer` that holds `parameter`."""
    (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return group


# ---------------------------------------------------------------- contrast


def test_the_stage1_loss_on_numbers_worked_by_hand(tiny_config):
    """alpha 0.1, beta 0.2; task 0.5, nce 3.0, lld 1.0, H 0.5. With contrast: 0.5 + 0.3 - 0.2 - 0.1
    = 0.5. Without: 0.5 - 0.1 = 0.4 (nce and lld are left out, H stays)."""
    terms = {name: torch.tensor(value) for name, value in (("task", 0.5), ("nce", 3.0), ("lld", 1.0), ("entropy", 0.5))}
    on = tiny_config.train.model_copy(update={"alpha": 0.1, "beta": 0.2, "contrast": True})
    assert stage1_loss(on, **terms).item() == pytest.approx(0.5)
    assert stage1_loss(on.model_copy(update={"contrast": False}), **terms).item() == pytest.approx(0.4)


def loss_of_the_means(engine, stage1: dict[str, float]) -> float:
    """stage1_loss of the epoch's reported mean terms: the mean loss, as every term is a mean over
    the same batches."""
    terms = {"task": stage1["task"], "nce": stage1["nce"], "lld": stage1["lld"], "entropy": stage1["H"]}
    return stage1_loss(engine.config, **{name: torch.tensor(value) for name, value in terms.items()}).item()


def test_contrast_off_runs_no_stage0_and_leaves_mmilb_untouched(tiny_config):
    engine, loaders = setup(tiny_config, contrast=False)
    before = mmilb_parameters(engine)
    record = engine.run_epoch(1, *loaders)
    assert record.stage0 == {}  # stage 0 did not run
    assert not engine.optimizer_mmilb.state  # the MMILB optimizer never stepped
    after = mmilb_parameters(engine)
    assert all(torch.equal(before[name], after[name]) for name in before)
    # nce and lld are computed (and not 0) but stay out of the loss: the loss is the
    # contrast-off one of the reported terms (every term is a mean over the same batches)
    stage1 = record.stage1
    assert stage1["nce"] != 0 and stage1["lld"] != 0 and stage1["H"] != 0
    assert stage1["loss"] == pytest.approx(loss_of_the_means(engine, stage1), rel=1e-5, abs=1e-6)

    # the same data with contrast on: stage 0 runs and steps MMILB
    engine, loaders = setup(tiny_config, contrast=True)
    before = mmilb_parameters(engine)
    record = engine.run_epoch(1, *loaders)
    assert set(record.stage0) == {"neg_lld"}
    after = mmilb_parameters(engine)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert record.stage1["loss"] == pytest.approx(loss_of_the_means(engine, record.stage1), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- depth


def test_two_lstm_layers_and_two_cpc_layers_build_and_train(tiny_config):
    model = {"lstm_layers": 2, "cpc_layers": 2, "dropout_audio": 0.2, "dropout_vision": 0.3}
    engine, loaders = setup(tiny_config, model)
    core, config = engine.core, engine.core.config
    shapes = {name: tuple(p.shape) for name, p in core.named_parameters()}
    for encoder, hidden, dim in (
        ("visual_enc", config.vision_hidden, config.vision_dim),
        ("acoustic_enc", config.audio_hidden, config.audio_dim),
    ):
        assert shapes[f"{encoder}.rnn.weight_ih_l0"] == (4 * hidden, dim)
        assert shapes[f"{encoder}.rnn.weight_ih_l1"] == (4 * hidden, hidden)  # the second layer
        assert f"{encoder}.rnn.weight_ih_l2" not in shapes
    # dropout between the LSTM layers and after the encoder: only with more than one layer
    assert core.visual_enc.rnn.dropout == 0.3 and core.visual_enc.dropout.p == 0.3
    assert core.acoustic_enc.rnn.dropout == 0.2 and core.acoustic_enc.dropout.p == 0.2
    text_dim, fusion = core.text_enc.bertmodel.config.hidden_size, config.fusion_hidden
    for head, size in (("cpc_zt", text_dim), ("cpc_zv", config.vision_out), ("cpc_za", config.audio_out)):
        # Linear(fusion -> size), activation, Linear(size -> size)
        assert shapes[f"{head}.net.0.weight"] == (size, fusion)
        assert isinstance(getattr(core, head).net[1], torch.nn.Tanh)
        assert shapes[f"{head}.net.2.weight"] == (size, size)
        assert f"{head}.net.weight" not in shapes

    record = engine.run_epoch(1, *loaders)
    assert all(math.isfinite(v) for v in [*record.stage0.values(), *record.stage1.values()])
    assert math.isfinite(record.valid["loss"])


def test_one_lstm_layer_uses_no_dropout_and_one_cpc_layer_is_one_linear(tiny_config):
    engine, _ = setup(tiny_config, {"dropout_audio": 0.2, "dropout_vision": 0.3})
    core = engine.core
    assert core.visual_enc.rnn.dropout == 0 and core.visual_enc.dropout.p == 0
    assert core.acoustic_enc.rnn.dropout == 0 and core.acoustic_enc.dropout.p == 0
    names = {name for name, _ in core.named_parameters()}
    assert "visual_enc.rnn.weight_ih_l1" not in names and "cpc_zt.net.weight" in names
    assert isinstance(core.cpc_zt.net, torch.nn.Linear)


# ---------------------------------------------------------------- optimizer and learning rates


def test_rmsprop_with_the_configured_rates_and_decays_per_group(tiny_config):
    rates = {"lr_main": 2e-3, "lr_bert": 3e-5, "lr_mmilb": 4e-3}
    decays = {"weight_decay_main": 1e-3, "weight_decay_bert": 2e-4, "weight_decay_mmilb": 3e-5}
    engine, loaders = setup(tiny_config, optimizer="RMSprop", **rates, **decays)
    main, mmilb = engine.optimizer_main, engine.optimizer_mmilb
    assert type(main) is torch.optim.RMSprop and type(mmilb) is torch.optim.RMSprop
    expected = {"bert": (3e-5, 2e-4), "main": (2e-3, 1e-3), "mmilb": (4e-3, 3e-5)}
    for name, parameter in engine.core.named_parameters():
        kind = "bert" if name.startswith("text_enc.") else "mmilb" if name.startswith("mi_") else "main"
        group = group_of(mmilb if kind == "mmilb" else main, parameter)
        assert (group["lr"], group["weight_decay"]) == expected[kind], name
        if kind == "mmilb":
            assert not any(p is parameter for g in main.param_groups for p in g["params"]), name
    engine.run_epoch(1, *loaders)
    fusion = engine.core.fusion_prj.linear_1.weight
    assert "square_avg" in main.state[fusion]  # RMSprop's own state: it stepped


def test_plateau_halves_main_and_bert_rates_after_when_plus_one_epochs_not_mmilb(tiny_config):
    when = 2
    engine, loaders = setup(tiny_config, when=when)
    main, mmilb = engine.optimizer_main, engine.optimizer_mmilb
    bert = group_of(main, next(engine.core.text_enc.parameters()))
    rest = group_of(main, engine.core.fusion_prj.linear_1.weight)
    rates = {"bert": engine.config.lr_bert, "main": engine.config.lr_main, "mmilb": engine.config.lr_mmilb}

    def current():
        return {"bert": bert["lr"], "main": rest["lr"], "mmilb": mmilb.param_groups[0]["lr"]}

    # run_epoch hands the validation loss to the scheduler
    record = engine.run_epoch(1, *loaders)
    assert engine.scheduler.best == record.valid["loss"]
    for _ in range(when):  # `when` epochs without improvement: patience not yet exhausted
        engine.scheduler.step(record.valid["loss"])
        assert current() == rates
    engine.scheduler.step(record.valid["loss"])  # the (when + 1)-th: halved
    assert current() == {"bert": rates["bert"] / 2, "main": rates["main"] / 2, "mmilb": rates["mmilb"]}
    for _ in range(when + 1):  # and again after another when + 1
        engine.scheduler.step(record.valid["loss"])
    assert current() == {"bert": rates["bert"] / 4, "main": rates["main"] / 4, "mmilb": rates["mmilb"]}
    engine.scheduler.step(record.valid["loss"] / 2)  # an improvement resets the count
    for _ in range(when):
        engine.scheduler.step(record.valid["loss"] / 2)
    assert current()["main"] == rates["main"] / 4
