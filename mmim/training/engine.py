"""The MMIM training engine: the official two-stage epoch, evaluation, model selection.

Each epoch (official `Solver.train_and_eval`):

  stage 0 (when `contrast`): maximise the MMILB log-likelihood lld; only the MMILB
          optimizer steps (MMILB parameters only). Optionally only the first
          `stage0_fraction` of the batches (the reference code uses 0.5 on MOSEI).
  stage 1: minimise  L1(score, y) + alpha * nce - beta * lld - beta * H  with the main
          optimizer (a BERT group with its own lr/weight decay + everything else but
          MMILB). H uses the previous batch's label groups as memory.
  then:   validation loss (= MAE) drives ReduceLROnPlateau and early stopping; the
          epoch with the lowest validation loss is selected, and its test metrics
          are the reported ones. (The reference code also looks at the test loss
          when choosing; we never do.)

The engine is plain PyTorch. Progress, checkpoints and experiment tracking hang on
`TrainingHooks`, so the same loop serves the CLI, notebooks and Ray workers.
"""

from __future__ import annotations

import ctypes
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from mmim.core.config import TrainConfig
from mmim.core.errors import MMIMInputError, TrainingDiverged
from mmim.core.metrics import compute_metrics
from mmim.core.model import MMIM
from mmim.core.selection import SELECTION
from mmim.training.predict import predict_scores

log = logging.getLogger(__name__)

# The entropy memory holds one previous batch (official mem_size = 1); H enters the
# loss from the batch after the first one that had a memory, as in the reference code.
MEMORY_BATCHES = 1
NO_BATCH = 2**62  # "no batch yet" for StageTotals' first non-finite batch (larger than any index)


def stage1_loss(
    config: TrainConfig, task: torch.Tensor, nce: torch.Tensor, lld: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:
    """task + alpha * nce - beta * lld - beta * H; without `contrast`, task - beta * H. H (entropy)
    is 0 until a memory of label groups is passed."""
    loss = task + config.alpha * nce - config.beta * lld if config.contrast else task
    return loss - config.beta * entropy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_instructions(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively. Without, bf16 is emulated (several times
    slower than fp32): CUDA before Ampere, x86 CPUs without AMX or AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
    return device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def keep_freed_memory_for_reuse() -> None:
    """Make glibc keep freed blocks for the next allocation instead of returning them to the kernel.

    A training step allocates and frees hundreds of MB (activations, gradients, bf16 copies of
    the weights); by default glibc unmaps every block over a few MB when it is freed, so the
    next step's blocks arrive as fresh pages that fault in one by one (measured on the CPU:
    60,000 faults per bert-base step, a sixth of a bf16 step). The process then keeps its peak
    step's memory, which it needs again at the next step anyway. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB come from the heap, not mmap
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # and the heap is not shrunk after each free


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MMIMInputError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(choice)


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The official grouping by name: BERT, MMILB (`mi_*`), and the rest ("main")."""
    groups: dict[str, list[nn.Parameter]] = {"bert": [], "mmilb": [], "main": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("text_enc."):
            groups["bert"].append(parameter)
        elif name.startswith("mi_"):
            groups["mmilb"].append(parameter)
        else:
            groups["main"].append(parameter)
    return groups


@dataclass
class EpochRecord:
    epoch: int
    stage0: dict[str, float]  # mean neg-lld of stage 0 ({} when contrast is off)
    stage1: dict[str, float]  # mean loss, task, nce, lld, H of stage 1
    lr: dict[str, float]
    valid: dict[str, float]  # metrics + "loss"
    test: dict[str, float]
    seconds: float


def flat_metrics(record: EpochRecord) -> dict[str, float]:
    """One level: epoch, stage1_loss, lr_main, valid_MAE, test_Acc-7, ... (for trackers)."""
    metrics: dict[str, float] = {"epoch": record.epoch, "seconds": record.seconds}
    for prefix, values in (
        ("stage0", record.stage0),
        ("stage1", record.stage1),
        ("lr", record.lr),
        ("valid", record.valid),
        ("test", record.test),
    ):
        metrics.update({f"{prefix}_{name.removeprefix('lr_')}": value for name, value in values.items()})
    return metrics


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """One line of progress from an epoch's flat metrics, e.g. for a terminal or a flow log."""
    return (
        f"epoch {int(metrics['epoch'])}/{epochs} | loss {metrics['stage1_loss']:.4f} | "
        f"valid MAE {metrics['valid_MAE']:.4f} Corr {metrics['valid_Corr']:.3f} | "
        f"{metrics['seconds']:.1f}s{' (best)' if metrics.get('improved') else ''}"
    )


@dataclass
class Loaders:
    train: DataLoader
    valid: DataLoader
    test: DataLoader


@dataclass
class FitResult:
    best: EpochRecord  # the selected epoch (mmim.core.selection), possibly from before a resume
    history: list[EpochRecord]  # the epochs this call trained
    stopped_early: bool


def evaluate(model: MMIM, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Metrics of a split plus "loss" (mean L1: the official validation loss, = MAE)."""
    predictions, truths = predict_scores(model, loader, device)
    metrics = compute_metrics(predictions, truths)
    metrics["loss"] = metrics["MAE"]
    return metrics


class TrainingHooks:
    """Override what you need; every method is a no-op by default."""

    def on_stage_start(self, epoch: int, stage: int, batches: int) -> None: ...

    def on_batch_end(self, epoch: int, stage: int) -> None: ...

    def on_epoch_end(self, record: EpochRecord, improved: bool) -> None: ...


class EpochReports(TrainingHooks):
    """Every finished epoch's flat metrics, with `improved`, to `on_epoch` (as a Ray worker reports them)."""

    def __init__(self, on_epoch: Callable[[dict], None]) -> None:
        self.on_epoch = on_epoch

    def on_epoch_end(self, record: EpochRecord, improved: bool) -> None:
        self.on_epoch({**flat_metrics(record), "improved": int(improved)})


class StageTotals:
    """A stage's per-batch scalars, summed on the training device and read once, when the stage ends.

    Reading a GPU scalar (`.item()`, `float()`) makes the host wait until the GPU has caught
    up; once per batch that would leave the GPU idle while the next batch is prepared. So the
    sample-weighted sums, and the first batch whose loss was not finite, stay tensors on the
    device until `close`, which also combines them over all ranks when distributed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.first_bad = torch.full((), NO_BATCH, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def add(self, index: int, size: int, loss: torch.Tensor, **values: torch.Tensor) -> None:
        """Batch `index` of the stage, of `size` examples: its loss and other figures (0-dim tensors)."""
        for name, value in {"loss": loss, **values}.items():
            weighted = value.detach().double() * size
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.count += size
        # The first non-finite loss of the stage and its batch, kept without a host sync.
        first = ~torch.isfinite(loss.detach()) & (self.first_bad == NO_BATCH)
        self.first_bad = torch.where(first, index, self.first_bad)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)

    def close(self, epoch: int, stage: int) -> dict[str, float]:
        """The stage's means over all ranks; raises TrainingDiverged (on every rank) if a loss was not finite.

        The weights are lost from the first non-finite loss on; the rest of the stage runs on
        them (that is the price of not checking every batch) and nothing after it does.
        """
        names = sorted(self.sums)
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.device)
        sums = torch.stack([self.sums[name] for name in names] + [count])
        first_bad = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # gloo and NCCL both take float64 on the CPU/GPU it lives on
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)  # the earliest bad batch of any rank
        if int(first_bad) != NO_BATCH:
            own = int(self.first_bad) == int(first_bad)
            loss = f"loss is {float(self.bad_loss)}" if own else "a loss on another rank is not finite"
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}, stage {stage}, batch {int(first_bad) + 1}: {loss} "
                "(lower the learning rates train.lr_main/lr_bert/lr_mmilb, or train.clip)"
            )
        values = sums.tolist()
        total = max(values[-1], 1.0)
        return {name: values[i] / total for i, name in enumerate(names)}


class ModelSelection:
    """The selected epoch so far (`mmim.core.selection`: lowest validation MAE, the official
    validation loss; the first of equal figures), and early-stopping patience."""

    def __init__(self, patience: int):
        self.patience = patience
        self.patience_left = patience
        self.best: EpochRecord | None = None

    def update(self, record: EpochRecord) -> bool:
        """Take an epoch's record; True when it is the new best."""
        improved = self.best is None or SELECTION.beats(
            record.valid[SELECTION.metric], self.best.valid[SELECTION.metric]
        )
        if improved:
            self.best, self.patience_left = record, self.patience
        else:
            self.patience_left -= 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience_left <= 0

    def state_dict(self) -> dict:
        return {"patience_left": self.patience_left, "best": asdict(self.best) if self.best else None}

    def load_state_dict(self, state: dict) -> None:
        self.patience_left = state["patience_left"]
        self.best = EpochRecord(**state["best"]) if state["best"] else None


class Engine:
    """Optimizers, scheduler and the per-stage loops around one MMIM model.

    Under DDP pass the wrapper as `ddp`: training forwards go through it (so gradients
    are synchronised), evaluation and parameter access use the plain model.
    """

    def __init__(
        self, model: MMIM, config: TrainConfig, device: torch.device | None = None, ddp: nn.Module | None = None
    ):
        self.config = config
        self.device = device or resolve_device(config.device)
        self.core = model.to(self.device)
        self.model = ddp if ddp is not None else self.core
        self.core.bf16 = config.bf16 and bf16_instructions(self.device)
        if config.bf16 and not self.core.bf16:
            log.warning(
                "train.bf16: %s has no bf16 instructions (bf16 would be emulated, slower than fp32): training in fp32",
                "this CPU" if self.device.type == "cpu" else self.device,
            )
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        groups = split_parameters(model)
        optimizer_class = getattr(torch.optim, config.optimizer)
        # Adam's fused kernel updates each tensor in one pass instead of one pass per operation
        # of the update: on bert-base it is most of a step's optimizer time (7x less on a CPU),
        # with the same arithmetic (parameters equal to a few 1e-9 after a step).
        fused = {"fused": True} if config.optimizer == "Adam" else {}
        self.optimizer_mmilb = optimizer_class(
            groups["mmilb"], lr=config.lr_mmilb, weight_decay=config.weight_decay_mmilb, **fused
        )
        self.optimizer_main = optimizer_class(
            [
                {"params": groups["bert"], "lr": config.lr_bert, "weight_decay": config.weight_decay_bert},
                {"params": groups["main"], "lr": config.lr_main, "weight_decay": config.weight_decay_main},
            ],
            **fused,
        )
        # Only the main optimizer's lr is decayed, as in the reference code.
        self.scheduler = ReduceLROnPlateau(self.optimizer_main, mode="min", patience=config.when, factor=0.5)
        self.l1 = nn.L1Loss()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": self.optimizer_main, "mmilb": self.optimizer_mmilb}

    def learning_rates(self) -> dict[str, float]:
        return {
            "lr_bert": self.optimizer_main.param_groups[0]["lr"],
            "lr_main": self.optimizer_main.param_groups[1]["lr"],
            "lr_mmilb": self.optimizer_mmilb.param_groups[0]["lr"],
        }

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()
        # Norm over all parameters' gradients, as in the reference code.
        nn.utils.clip_grad_norm_(self.core.parameters(), self.config.clip)
        optimizer.step()

    def train_stage0(self, loader: DataLoader, epoch: int = 0, hooks: TrainingHooks | None = None) -> dict[str, float]:
        """Maximise lld with the MMILB optimizer; returns {"neg_lld": mean}."""
        hooks = hooks or TrainingHooks()
        self.model.train()
        fast = self.config.stage0_mode == "fast"
        batches = math.ceil(len(loader) * self.config.stage0_fraction)
        hooks.on_stage_start(epoch, 0, batches)
        totals = StageTotals(self.device)
        # The encoders are not stepped in stage 0: their bf16 weights are cast once for the stage.
        with self.core.reusing_bf16_weights():
            for index, batch in enumerate(loader):
                if index >= batches:
                    break
                batch = batch.to(self.device)
                self.core.zero_grad(set_to_none=True)
                # fast: nor is their graph recorded.
                lld = self.model(**batch.model_inputs(), mmilb_only=fast).lld
                loss = -lld
                self._step(loss, self.optimizer_mmilb)
                totals.add(index, len(batch), loss)
                hooks.on_batch_end(epoch, 0)
        means = totals.close(epoch, 0)
        return {"neg_lld": means["loss"]} if means else {}

    def train_stage1(self, loader: DataLoader, epoch: int = 0, hooks: TrainingHooks | None = None) -> dict[str, float]:
        """Minimise the task loss with the MI terms; returns means of loss, task, nce, lld, H."""
        hooks = hooks or TrainingHooks()
        config = self.config
        self.model.train()
        hooks.on_stage_start(epoch, 1, len(loader))
        totals = StageTotals(self.device)
        memory = None  # label groups of the previous batch; reset every epoch
        for index, batch in enumerate(loader):
            batch = batch.to(self.device)
            self.core.zero_grad(set_to_none=True)
            # The reference code also computes H on the second batch without using it;
            # computing it only when it enters the loss gives the same updates (and keeps
            # every forward output in the loss, which DDP requires).
            output = self.model(
                **batch.model_inputs(), labels=batch.labels, memory=memory if index > MEMORY_BATCHES else None
            )
            task = self.l1(output.score, batch.labels)
            loss = stage1_loss(config, task, output.nce, output.lld, output.entropy)
            self._step(loss, self.optimizer_main)
            memory = output.memory
            totals.add(index, len(batch), loss, task=task, nce=output.nce, lld=output.lld, H=output.entropy)
            hooks.on_batch_end(epoch, 1)
        return totals.close(epoch, 1)

    def run_epoch(
        self, epoch: int, train: DataLoader, valid: DataLoader, test: DataLoader, hooks: TrainingHooks | None = None
    ) -> EpochRecord:
        start = time.perf_counter()
        stage0 = self.train_stage0(train, epoch, hooks) if self.config.contrast else {}
        stage1 = self.train_stage1(train, epoch, hooks)
        lr = self.learning_rates()
        valid_metrics = evaluate(self.core, valid, self.device)
        test_metrics = evaluate(self.core, test, self.device)
        self.scheduler.step(valid_metrics["loss"])
        return EpochRecord(epoch, stage0, stage1, lr, valid_metrics, test_metrics, time.perf_counter() - start)


def reseed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Random numbers of an epoch from (seed, epoch, rank) alone: a run resumed after epoch k
    draws the same dropout masks in epoch k + 1 as one that never stopped."""
    torch.manual_seed(seed + 1000 * epoch + rank)


def fit(
    engine: Engine,
    loaders: Loaders,
    hooks: TrainingHooks | None = None,
    *,
    selection: ModelSelection | None = None,
    start_epoch: int = 1,
    rank: int = 0,
) -> FitResult:
    """Train from `start_epoch` to `train.epochs` with early stopping; select on validation only (SELECTION).

    The one epoch loop of every path: `mmim train` in one process and every Ray worker (which
    passes the selection and epoch it resumed from, and reports each epoch through `hooks`).
    """
    hooks = hooks or TrainingHooks()
    config = engine.config
    selection = selection or ModelSelection(config.patience)
    history: list[EpochRecord] = []
    for epoch in range(start_epoch, config.epochs + 1):
        if selection.should_stop:
            log.info("early stop: no validation improvement for %d epochs", config.patience)
            break
        set_epoch = getattr(loaders.train.sampler, "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: this epoch's shuffle
            set_epoch(epoch)
        reseed_epoch(config.seed, epoch, rank)
        record = engine.run_epoch(epoch, loaders.train, loaders.valid, loaders.test, hooks)
        history.append(record)
        improved = selection.update(record)
        log.info(
            "epoch %d: stage1 loss %.4f | valid MAE %.4f | test MAE %.4f%s",
            epoch,
            record.stage1["loss"],
            record.valid["MAE"],
            record.test["MAE"],
            " (best)" if improved else "",
        )
        hooks.on_epoch_end(record, improved)
    if selection.best is None:
        raise MMIMInputError(f"train.epochs {config.epochs}: no epoch to train after epoch {start_epoch - 1}")
    return FitResult(selection.best, history, stopped_early=selection.should_stop)
