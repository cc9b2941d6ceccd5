"""The MMIM model (Han, Chen & Poria, EMNLP 2021), module for module as in the official code.

    text  --BERT, CLS vector---------> t ─┐
    audio --LSTM over packed seqs----> a ─┼─> fusion subnet -> f -> score
    vision --LSTM over packed seqs---> v ─┘
    MMILB(t->v), MMILB(t->a) [, MMILB(v->a)]: lld (and the entropy H from label groups)
    CPC(f->t), CPC(f->v), CPC(f->a): nce

Attribute names (`text_enc.bertmodel`, `visual_enc.rnn`, `mi_tv.mlp_mu`, `cpc_zt.net`,
`fusion_prj.linear_1`, ...) are the official ones, so a state dict saved by the
reference implementation loads with `strict=True` (see `load_official_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from mmim.core.config import ModelConfig
from mmim.core.errors import MMIMInputError
from mmim.core.text_encoder import build_backbone

# Buffers that older transformers releases saved in BERT state dicts and newer ones don't.
_LEGACY_BUFFERS = ("text_enc.bertmodel.embeddings.position_ids",)


class TextEncoder(nn.Module):
    """BERT-family encoder; the utterance vector is the CLS token of the last layer."""

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.bertmodel = backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        # The mask goes in as an additive 4D bias (0 where a token counts, the dtype's minimum on
        # padding), which transformers hands to attention as it is. From a 2D mask it would first
        # ask whether any token is padding: a read back from the GPU on every forward pass.
        dtype = self.bertmodel.dtype
        bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        hidden = self.bertmodel(
            input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids
        ).last_hidden_state
        return hidden[:, 0]


class SequenceEncoder(nn.Module):
    """LSTM over a padded batch of variable-length sequences -> final hidden state -> linear.

    The final state is each sequence's own: after its last real frame (forward direction) or
    its first (backward), exactly what an LSTM over packed sequences returns. It is computed
    with the fused LSTM kernel over the padded batch instead, which packing rules out: the
    forward direction's output at a sequence's last real frame has not seen the padding after
    it, and the backward direction runs over each sequence reversed within its length, so
    that the padding again comes after the real frames. (On the CPU the packed LSTM runs a
    step at a time, and its backward pass zeroes a gradient the size of the whole input at
    every step: 4x slower here, a second per batch of 500-frame MOSI videos.)
    """

    def __init__(
        self, in_size: int, hidden_size: int, out_size: int, num_layers: int, dropout: float, bidirectional: bool
    ):
        super().__init__()
        self.bidirectional = bidirectional
        # The module holds the weights under the official names (`rnn.weight_ih_l0`, ...).
        self.rnn = nn.LSTM(
            in_size, hidden_size, num_layers=num_layers, dropout=dropout, bidirectional=bidirectional, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.linear_1 = nn.Linear((2 if bidirectional else 1) * hidden_size, out_size)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x: (batch, frames, dim), real frames first; lengths: (batch,), each at least 1."""
        lengths = lengths.to(x.device, non_blocking=True)
        outputs = x
        for layer in range(self.rnn.num_layers):
            # Between layers, dropout on the outputs as nn.LSTM does.
            inputs = nn.functional.dropout(outputs, self.rnn.dropout, self.training) if layer else outputs
            directions = [self._run(inputs, f"_l{layer}")]
            if self.bidirectional:
                backward = self._run(reverse_within(inputs, lengths), f"_l{layer}_reverse")
                directions.append(reverse_within(backward, lengths))
            outputs = torch.cat(directions, dim=-1)
        rows = torch.arange(len(x), device=x.device)
        hidden = self.rnn.hidden_size
        h = outputs[rows, lengths - 1, :hidden]  # the forward direction after the last real frame
        if self.bidirectional:  # the backward direction after the first frame
            h = torch.cat((h, outputs[:, 0, hidden:]), dim=-1)
        return self.linear_1(self.dropout(h))

    def _run(self, inputs: Tensor, suffix: str) -> Tensor:
        """One layer in one direction (weights `*{suffix}`) from zero states: outputs (batch, frames, hidden)."""
        weights = [getattr(self.rnn, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        zeros = inputs.new_zeros(1, len(inputs), self.rnn.hidden_size)
        outputs, _, _ = torch.lstm(inputs, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)
        return outputs


def reverse_within(x: Tensor, lengths: Tensor) -> Tensor:
    """Each sequence of `x` (batch, frames, dim) with its real frames in reverse order, padding left behind them."""
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


@dataclass
class LabelGroups:
    """Entropy projections of one batch and which rows are positive / negative (zero labels: neither).

    Masks rather than selected rows: selecting rows by a mask makes the host wait for the GPU
    to learn how many there are, twice per modality pair and batch.
    """

    projected: Tensor  # (batch, d)
    positive: Tensor  # (batch,) bool
    negative: Tensor  # (batch,) bool

    def detach(self) -> "LabelGroups":
        return LabelGroups(self.projected.detach(), self.positive, self.negative)

    def after(self, memory: "LabelGroups") -> "LabelGroups":
        """The memory's rows followed by this batch's (the samples H is estimated from)."""
        return LabelGroups(
            torch.cat([memory.projected, self.projected]),
            torch.cat([memory.positive, self.positive]),
            torch.cat([memory.negative, self.negative]),
        )


def gaussian_entropy_term(samples: Tensor, rows: Tensor | None = None) -> Tensor:
    """log det of the (biased) covariance of the `rows` (a bool mask; default all) of `samples` (n, d),
    or 0 when it is undefined.

    The official estimator is 0.25 * (logdet cov_pos + logdet cov_neg). With n <= d
    samples the covariance is singular (logdet = -inf), and a tanh projection can make
    it numerically non-positive-definite; either would turn the loss into inf/NaN.
    Our guard: such a group contributes 0 to H (no gradient), the other group still counts.
    It is decided on the device (`torch.where`), so a training step never waits on the GPU.
    """
    d = samples.shape[1]
    samples = samples.float()  # covariance and logdet in fp32, also under autocast
    weights = (torch.ones(len(samples), device=samples.device) if rows is None else rows.float()).unsqueeze(1)
    count = weights.sum()
    mean = (samples * weights).sum(dim=0) / count.clamp(min=1)
    centered = (samples - mean) * weights  # rows outside the group are zero
    covariance = centered.T @ centered / count.clamp(min=1)
    sign, logabsdet = torch.linalg.slogdet(covariance.detach())
    defined = (count > d) & (sign > 0) & torch.isfinite(logabsdet)
    # Where undefined, the identity stands in: log det 0 and a finite gradient (that `where`
    # then zeroes), instead of the inverse of a singular matrix, which would be NaN.
    identity = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    _, guarded = torch.linalg.slogdet(torch.where(defined, covariance, identity))
    return torch.where(defined, guarded, torch.zeros_like(guarded))


class MMILB(nn.Module):
    """Modality mutual-information lower bound: a Gaussian q(y|x) and label-group entropy."""

    def __init__(self, x_size: int, y_size: int, activation: str = "ReLU"):
        super().__init__()
        act = getattr(nn, activation)
        self.mlp_mu = nn.Sequential(nn.Linear(x_size, y_size), act(), nn.Linear(y_size, y_size))
        self.mlp_logvar = nn.Sequential(nn.Linear(x_size, y_size), act(), nn.Linear(y_size, y_size))
        self.entropy_prj = nn.Sequential(nn.Linear(y_size, y_size // 4), nn.Tanh())

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        mu, logvar = self.mlp_mu(x), self.mlp_logvar(x)
        return torch.mean(torch.sum(-((mu - y) ** 2) / 2.0 / torch.exp(logvar), dim=-1))

    def forward(
        self, x: Tensor, y: Tensor, labels: Tensor | None = None, memory: LabelGroups | None = None
    ) -> tuple[Tensor, Tensor, LabelGroups | None]:
        """Returns (lld, H, this batch's label groups). H needs labels and a memory."""
        lld = self.log_likelihood(x, y)
        if labels is None:
            return lld, lld.new_zeros(()), None
        labels = labels.view(-1)
        groups = LabelGroups(self.entropy_prj(y), labels > 0, labels < 0)
        if memory is None:
            return lld, lld.new_zeros(()), groups
        both = groups.after(memory)
        entropy = 0.25 * (
            gaussian_entropy_term(both.projected, both.positive) + gaussian_entropy_term(both.projected, both.negative)
        )
        return lld, entropy, groups


class CPC(nn.Module):
    """Contrastive predictive coding: predict a modality vector x from the fusion vector y."""

    def __init__(self, x_size: int, y_size: int, n_layers: int = 1, activation: str = "Tanh"):
        super().__init__()
        if n_layers == 1:
            self.net: nn.Module = nn.Linear(y_size, x_size)
        else:
            layers: list[nn.Module] = [nn.Linear(y_size, x_size), getattr(nn, activation)()]
            layers += [nn.Linear(x_size, x_size) for _ in range(n_layers - 1)]
            self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x_pred = self.net(y)
        x_pred = x_pred / x_pred.norm(dim=1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True)
        positive = torch.sum(x * x_pred, dim=-1)
        # The other samples of the batch are the negatives.
        negative = torch.logsumexp(x @ x_pred.T, dim=-1)
        return -(positive - negative).mean()


class FusionNet(nn.Module):
    """dropout -> linear+tanh -> linear+tanh (the fusion vector) -> linear (the score)."""

    def __init__(self, in_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.linear_1 = nn.Linear(in_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.linear_3 = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(self.linear_1(self.drop(x)))
        fusion = torch.tanh(self.linear_2(hidden))
        return fusion, self.linear_3(fusion).squeeze(-1)


@dataclass
class MMIMOutput:
    score: Tensor  # (batch,) predicted sentiment
    lld: Tensor  # MMILB log-likelihood, summed over the modality pairs
    nce: Tensor  # CPC loss, summed over t, v, a
    entropy: Tensor  # H in the paper; 0 without labels and memory
    memory: dict[str, LabelGroups] | None  # this batch's label groups: the next batch's memory


class MMIM(nn.Module):
    def __init__(self, config: ModelConfig, text_backbone: PreTrainedModel):
        super().__init__()
        if config.audio_dim is None or config.vision_dim is None:
            raise MMIMInputError("model.audio_dim / model.vision_dim: not set (they come from the feature store)")
        self.config = config
        text_dim = text_backbone.config.hidden_size
        self.bf16 = False  # set by the engine (train.bf16): autocast the text encoder only
        self.text_enc = TextEncoder(text_backbone)

        def lstm(in_size: int | None, hidden_size: int, out_size: int, dropout: float) -> SequenceEncoder:
            if in_size is None:
                raise MMIMInputError("model.audio_dim/vision_dim: unset (they come from the feature store)")
            # As in the reference code, LSTM dropout (inside and after) is only used with >1 layer.
            dropout = dropout if config.lstm_layers > 1 else 0.0
            return SequenceEncoder(in_size, hidden_size, out_size, config.lstm_layers, dropout, config.bidirectional)

        self.visual_enc = lstm(config.vision_dim, config.vision_hidden, config.vision_out, config.dropout_vision)
        self.acoustic_enc = lstm(config.audio_dim, config.audio_hidden, config.audio_out, config.dropout_audio)
        self.mi_tv = MMILB(text_dim, config.vision_out, config.mmilb_activation)
        self.mi_ta = MMILB(text_dim, config.audio_out, config.mmilb_activation)
        if config.add_va:
            self.mi_va = MMILB(config.vision_out, config.audio_out, config.mmilb_activation)
        self.cpc_zt = CPC(text_dim, config.fusion_hidden, config.cpc_layers, config.cpc_activation)
        self.cpc_zv = CPC(config.vision_out, config.fusion_hidden, config.cpc_layers, config.cpc_activation)
        self.cpc_za = CPC(config.audio_out, config.fusion_hidden, config.cpc_layers, config.cpc_activation)
        self.fusion_prj = FusionNet(
            text_dim + config.audio_out + config.vision_out, config.fusion_hidden, config.dropout_fusion
        )

    @contextmanager
    def reusing_bf16_weights(self) -> Iterator[None]:
        """Under `bf16`, make the bf16 copies of the text encoder's weights once for the whole block
        rather than at every forward pass (85M weights a batch for bert-base: about 50 ms on a CPU).

        Only for stretches in which those weights do not change: stage 0, which steps MMILB alone,
        and evaluation. (Autocast keeps its casts until the outermost autocast block exits; this
        opens an outer block that itself autocasts nothing.)
        """
        with torch.autocast(next(self.parameters()).device.type, enabled=False):
            yield

    def mmilb_pairs(self) -> dict[str, MMILB]:
        pairs = {"tv": self.mi_tv, "ta": self.mi_ta}
        if self.config.add_va:
            pairs["va"] = self.mi_va
        return pairs

    def encode(
        self, input_ids, attention_mask, token_type_ids, audio, audio_lengths, vision, vision_lengths
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The three unimodal vectors (t, a, v), always returned in fp32 (inputs: as `forward` takes them)."""
        # bf16 pays only where the matmuls are large: BERT's. The LSTMs (16 wide) stay fp32.
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            text = self.text_enc(input_ids, attention_mask, token_type_ids)
        return text.float(), self.acoustic_enc(audio, audio_lengths), self.visual_enc(vision, vision_lengths)

    def mmilb(
        self,
        text: Tensor,
        acoustic: Tensor,
        visual: Tensor,
        labels: Tensor | None = None,
        memory: dict[str, LabelGroups] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, LabelGroups] | None]:
        """(lld, H, label groups) summed over the modality pairs."""
        inputs = {"tv": (text, visual), "ta": (text, acoustic), "va": (visual, acoustic)}
        lld = text.new_zeros(())
        entropy = text.new_zeros(())
        groups: dict[str, LabelGroups] = {}
        for pair, module in self.mmilb_pairs().items():
            x, y = inputs[pair]
            pair_lld, pair_entropy, pair_groups = module(x, y, labels, None if memory is None else memory[pair])
            lld = lld + pair_lld
            entropy = entropy + pair_entropy
            if pair_groups is not None:
                groups[pair] = pair_groups.detach()
        return lld, entropy, (groups if labels is not None else None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
        audio: Tensor,
        audio_lengths: Tensor,
        vision: Tensor,
        vision_lengths: Tensor,
        labels: Tensor | None = None,
        memory: dict[str, LabelGroups] | None = None,
        mmilb_only: bool = False,
    ) -> MMIMOutput:
        """All outputs; `mmilb_only` is the fast stage 0: encoders without autograd, lld only.

        (The fast path goes through forward rather than calling `encode`/`mmilb` directly
        so that a DistributedDataParallel wrapper sees it and synchronises the gradients.)
        """
        inputs = (input_ids, attention_mask, token_type_ids, audio, audio_lengths, vision, vision_lengths)
        if mmilb_only:
            with torch.no_grad():
                text, acoustic, visual = self.encode(*inputs)
            lld, _, _ = self.mmilb(text, acoustic, visual)
            zero = lld.new_zeros(())
            return MMIMOutput(score=lld.new_zeros(len(text)), lld=lld, nce=zero, entropy=zero, memory=None)
        text, acoustic, visual = self.encode(*inputs)
        lld, entropy, groups = self.mmilb(text, acoustic, visual, labels, memory)
        fusion, score = self.fusion_prj(torch.cat([text, acoustic, visual], dim=1))
        nce = self.cpc_zt(text, fusion) + self.cpc_zv(visual, fusion) + self.cpc_za(acoustic, fusion)
        return MMIMOutput(score=score, lld=lld, nce=nce, entropy=entropy, memory=groups)


def init_weights_like_official(model: MMIM) -> None:
    """Xavier-normal init of every non-BERT weight with more than one dimension."""
    for name, parameter in model.named_parameters():
        if not name.startswith("text_enc.") and parameter.dim() > 1:
            nn.init.xavier_normal_(parameter)


def build_model(config: ModelConfig) -> MMIM:
    """A fresh MMIM: pretrained (or random) text encoder + Xavier-initialised rest."""
    model = MMIM(config, build_backbone(config.text_encoder, config.text_pretrained))
    init_weights_like_official(model)
    return model


def load_official_state_dict(model: MMIM, state_dict: dict[str, Tensor]) -> None:
    """Load weights saved by the reference implementation (or by us) with strict=True."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _LEGACY_BUFFERS}
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise MMIMInputError(
            f"state dict does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise MMIMInputError(
            f"state dict does not match the model: {wrong[0]} has shape {tuple(state_dict[wrong[0]].shape)}, "
            f"the model expects {tuple(own[wrong[0]].shape)}"
        )
    model.load_state_dict(state_dict, strict=True)
