"""The model: official parameter names, strict loading, finite deterministic outputs, the H guard."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmim.core.batches import pad_sequences
from mmim.core.config import ModelConfig
from mmim.core.errors import MMIMInputError
from mmim.core.model import (
    MMILB,
    LabelGroups,
    SequenceEncoder,
    build_model,
    gaussian_entropy_term,
    load_official_state_dict,
)
from mmim.training.checkpoint import read_official_weights

# The official module names (declare-lab/Multimodal-Infomax, src/model.py + modules/encoders.py).
OFFICIAL_KEYS = [
    "text_enc.bertmodel.embeddings.word_embeddings.weight",
    "text_enc.bertmodel.pooler.dense.weight",
    "visual_enc.rnn.weight_ih_l0",
    "visual_enc.rnn.weight_hh_l0",
    "visual_enc.rnn.bias_ih_l0",
    "visual_enc.linear_1.weight",
    "acoustic_enc.rnn.weight_ih_l0",
    "acoustic_enc.linear_1.bias",
    "mi_tv.mlp_mu.0.weight",
    "mi_tv.mlp_mu.2.weight",
    "mi_tv.mlp_logvar.0.weight",
    "mi_tv.mlp_logvar.2.bias",
    "mi_tv.entropy_prj.0.weight",
    "mi_ta.entropy_prj.0.bias",
    "cpc_zt.net.weight",
    "cpc_zv.net.bias",
    "cpc_za.net.weight",
    "fusion_prj.linear_1.weight",
    "fusion_prj.linear_2.weight",
    "fusion_prj.linear_3.bias",
]


def model_config(tiny_encoder, **overrides) -> ModelConfig:
    return ModelConfig(
        text_encoder=tiny_encoder, text_pretrained=False, audio_dim=5, vision_dim=20, max_tokens=50, **overrides
    )


def raw_inputs(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_a = torch.randint(1, 12, (batch,), generator=g)
    lengths_v = torch.randint(1, 9, (batch,), generator=g)
    return {
        "input_ids": torch.randint(5, 40, (batch, 7), generator=g),
        "attention_mask": torch.ones(batch, 7, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, 7, dtype=torch.long),
        "audio": torch.randn(batch, int(lengths_a.max()), 5, generator=g),
        "audio_lengths": lengths_a,
        "vision": torch.randn(batch, int(lengths_v.max()), 20, generator=g),
        "vision_lengths": lengths_v,
    }


def official_state_dict(tiny_encoder, path, **overrides):
    """A state dict as the reference code saves it: official names, plus the legacy BERT buffer."""
    torch.manual_seed(7)
    state = {
        k: v.clone().contiguous() for k, v in build_model(model_config(tiny_encoder, **overrides)).state_dict().items()
    }
    state["text_enc.bertmodel.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(state, str(path))
    return load_file(str(path))


def test_official_state_dict_loads_strict_and_outputs_are_finite_and_deterministic(tiny_encoder, tmp_path):
    state = official_state_dict(tiny_encoder, tmp_path / "official.safetensors")
    assert set(OFFICIAL_KEYS) <= set(state)
    model = build_model(model_config(tiny_encoder))
    load_official_state_dict(model, state)
    model.eval()
    labels = torch.tensor([1.5, -2.0, 0.0, 2.5, -0.5, 1.0, -1.0, 3.0])
    first = model(**raw_inputs(), labels=labels)
    # second pass with the first batch's label groups as entropy memory
    second = model(**raw_inputs(seed=1), labels=labels, memory=first.memory)
    again = model(**raw_inputs(seed=1), labels=labels, memory=first.memory)
    for out in (first, second):
        for value in (out.score, out.lld, out.nce, out.entropy):
            assert torch.isfinite(value).all()
    assert second.score.shape == (8,)
    assert second.entropy.item() != 0.0  # 8 positives+negatives over two batches: H is defined
    for name in ("score", "lld", "nce", "entropy"):
        assert torch.equal(getattr(second, name), getattr(again, name))


def test_add_va_and_bidirectional_use_official_names(tiny_encoder, tmp_path):
    state = official_state_dict(tiny_encoder, tmp_path / "va.safetensors", add_va=True, bidirectional=True)
    assert "mi_va.mlp_mu.0.weight" in state and "visual_enc.rnn.weight_ih_l0_reverse" in state
    assert state["visual_enc.linear_1.weight"].shape == (16, 32)  # both directions concatenated
    model = build_model(model_config(tiny_encoder, add_va=True, bidirectional=True))
    load_official_state_dict(model, state)
    out = model(**raw_inputs(), labels=torch.linspace(-2, 2, 8))
    assert torch.isfinite(out.lld) and out.memory is not None and set(out.memory) == {"tv", "ta", "va"}


def test_mismatched_state_dict_is_a_clear_error(tiny_encoder, tmp_path):
    state = official_state_dict(tiny_encoder, tmp_path / "s.safetensors")
    model = build_model(model_config(tiny_encoder, add_va=True))
    with pytest.raises(MMIMInputError, match="missing .*mi_va"):
        load_official_state_dict(model, state)
    state["fusion_prj.linear_3.weight"] = torch.zeros(1, 3)
    with pytest.raises(MMIMInputError, match="fusion_prj.linear_3.weight has shape"):
        load_official_state_dict(build_model(model_config(tiny_encoder)), state)


def test_padding_does_not_change_the_sequence_encoding(tiny_encoder):
    model = build_model(model_config(tiny_encoder)).eval()
    inputs = raw_inputs(batch=4)
    padded = dict(inputs, audio=torch.cat([inputs["audio"], torch.randn(4, 5, 5)], dim=1))
    _, a1, _ = model.encode(**inputs)
    _, a2, _ = model.encode(**padded)
    assert torch.allclose(a1, a2, atol=1e-6)


def test_entropy_guard_when_a_label_group_is_too_small():
    torch.manual_seed(0)
    mmilb = MMILB(x_size=8, y_size=16)  # entropy projection to 4 dims
    x, y = torch.randn(6, 8), torch.randn(6, 16)
    # 5 positives, 1 negative in this batch; memory adds 1 more of each: the negative
    # group has 2 samples for a 4-dim covariance (singular), the positive group 6.
    labels = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0, -1.0])
    _, _, groups = mmilb(x, y, labels)
    memory = LabelGroups(groups.projected[[0, 5]], torch.tensor([True, False]), torch.tensor([False, True]))
    _, entropy, _ = mmilb(x, y, labels, memory)
    assert torch.isfinite(entropy)
    positives = torch.cat([groups.projected[:1], groups.projected[labels > 0]])
    expected = 0.25 * gaussian_entropy_term(positives)
    assert torch.allclose(entropy, expected) and entropy.item() != 0.0
    entropy.backward()  # the guarded group contributes no NaN gradient
    assert all(torch.isfinite(p.grad).all() for p in mmilb.entropy_prj.parameters())


def test_entropy_guard_on_degenerate_covariance():
    identical = torch.ones(10, 4) * 0.3  # full sample count but zero variance
    assert gaussian_entropy_term(identical).item() == 0.0
    empty = torch.zeros(0, 4)
    assert gaussian_entropy_term(empty).item() == 0.0


def entropy_of_selected_rows(samples):
    """The guard as it was written with row selection and host checks (the reference for the masked one)."""
    n, d = samples.shape
    if n <= d:
        return samples.new_zeros(())
    centered = samples - samples.mean(dim=0)
    sign, logabsdet = torch.linalg.slogdet(centered.T @ centered / n)
    if sign.item() <= 0 or not torch.isfinite(logabsdet).item():
        return samples.new_zeros(())
    return logabsdet


@pytest.mark.parametrize("rows", [3, 4, 5, 9, 32])
def test_masked_entropy_equals_the_selected_rows_one_with_gradients(rows):
    """The device-side guard gives today's H and gradients: defined, too few rows, degenerate."""
    torch.manual_seed(rows)
    samples = torch.tanh(torch.randn(40, 4))
    samples[30:] = 0.25  # rows 30.. are identical: a group of only those has no variance
    for chosen in (torch.randperm(30)[:rows], torch.arange(30, 30 + min(rows, 10))):
        mask = torch.zeros(40, dtype=torch.bool)
        mask[chosen] = True
        ours = samples.clone().requires_grad_()
        theirs = samples.clone().requires_grad_()
        masked, selected = gaussian_entropy_term(ours, mask), entropy_of_selected_rows(theirs[mask])
        torch.testing.assert_close(masked, selected, rtol=1e-5, atol=1e-6)
        if selected.requires_grad:
            masked.backward()
            selected.backward()
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
        else:  # the guard: 0 and no gradient
            assert masked.item() == 0.0
            masked.backward()
            assert not ours.grad.any()


def test_missing_dims_is_a_clear_error(tiny_encoder):
    with pytest.raises(MMIMInputError, match="audio_dim"):
        build_model(ModelConfig(text_encoder=tiny_encoder, text_pretrained=False))


class _Payload:
    """Unpickling this would run `touch` on a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_official_torch_save_file_loads_and_hostile_pickles_are_refused(tiny_encoder, tmp_path):
    state = official_state_dict(tiny_encoder, tmp_path / "s.safetensors")
    torch.save(state, tmp_path / "best_model.pt")  # how the reference code saves
    model = build_model(model_config(tiny_encoder))
    load_official_state_dict(model, read_official_weights(tmp_path / "best_model.pt"))
    assert torch.equal(model.state_dict()["mi_tv.mlp_mu.0.weight"], state["mi_tv.mlp_mu.0.weight"])

    marker = tmp_path / "pwned"

    (tmp_path / "hostile.pt").write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(MMIMInputError, match="hostile.pt: not a plain state dict"):
        read_official_weights(tmp_path / "hostile.pt")
    assert not marker.exists()
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "best_model.pt").read_bytes()[:200])
    with pytest.raises(MMIMInputError, match="truncated.pt: not a plain state dict"):
        read_official_weights(tmp_path / "truncated.pt")


def packed_lstm_state(encoder, x, lengths):
    """The reference: nn.LSTM over packed sequences (the official encoder), last layer's final state(s)."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _, (h_n, _) = encoder.rnn(packed)
    return torch.cat((h_n[-2], h_n[-1]), dim=-1) if encoder.bidirectional else h_n[-1]


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (1, True), (2, True)])
def test_the_sequence_encoder_returns_the_packed_lstms_state_and_gradients(layers, bidirectional):
    torch.manual_seed(layers)
    encoder = SequenceEncoder(5, 8, 4, layers, dropout=0.0, bidirectional=bidirectional)
    encoder.linear_1 = torch.nn.Identity()  # compare the LSTM state itself
    lengths = torch.tensor([7, 1, 12, 3, 12])
    x = torch.randn(5, 15, 5)  # padded past the longest sequence too
    ours = encoder(x, lengths)
    reference = packed_lstm_state(encoder, x, lengths)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    weights = list(encoder.rnn.parameters())
    ours_grads = torch.autograd.grad((ours * torch.arange(ours.shape[1])).sum(), weights)
    reference_grads = torch.autograd.grad((reference * torch.arange(ours.shape[1])).sum(), weights)
    for mine, theirs in zip(ours_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_batch_with_an_empty_sequence_is_refused_before_the_model():
    with pytest.raises(MMIMInputError, match="no frames .example 1 of the batch"):
        pad_sequences([np.ones((3, 5), dtype=np.float32), np.ones((0, 5), dtype=np.float32)])
