"""Batches from the feature store: a Dataset over one split, and a collate that only pads.

Nothing is tokenized or transformed here: token ids were made at extraction, and
sequences come straight from memory-mapped arrays. Each batch is padded to its own
longest utterance and its own longest audio/vision sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmim.core.errors import MMIMInputError
from mmim.core.store import StoreSplit


@dataclass
class Batch:
    input_ids: Tensor  # (B, tokens) int64
    attention_mask: Tensor  # (B, tokens) int64
    token_type_ids: Tensor  # (B, tokens) int64
    audio: Tensor  # (B, frames, audio_dim) float32, zero-padded at the end
    audio_lengths: Tensor  # (B,) int64
    vision: Tensor  # (B, frames, vision_dim) float32
    vision_lengths: Tensor  # (B,) int64
    labels: Tensor  # (B,) float32
    ids: list[str]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            # Lengths stay on the CPU: packing sequences needs them there.
            if isinstance(value, Tensor) and not name.endswith("_lengths"):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """Page-locked copies (`DataLoader(pin_memory=True)` calls this): copies to the GPU then
        run asynchronously."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **{name: tensor.pin_memory() for name, tensor in tensors.items()})

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for `MMIM.forward` / `MMIM.encode` (labels excluded)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("labels", "ids")}

    def __len__(self) -> int:
        return len(self.ids)


class SplitDataset(Dataset):
    """Example i of a store split as numpy views (no copies until collate)."""

    def __init__(self, split: StoreSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        split = self.split
        return {"index": index, "audio": split.sequence("audio", index), "vision": split.sequence("vision", index)}


def pad_sequences(sequences: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """(batch, longest, dim) zero-padded at the end, and the (batch,) lengths."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if lengths.min() < 1:  # the model's sequence encoders start from a sequence's first frame
        raise MMIMInputError(f"a sequence of the batch has no frames (example {int(lengths.argmin())} of the batch)")
    padded = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return torch.from_numpy(padded), torch.from_numpy(lengths)


def make_collate(split: StoreSplit):
    """A collate function bound to `split` (text arrays are sliced once per batch)."""

    def collate(examples: list[dict]) -> Batch:
        indices = np.fromiter((e["index"] for e in examples), dtype=np.int64, count=len(examples))
        mask = split.attention_mask[indices]
        tokens = int(mask.sum(axis=1).max())  # the batch's longest utterance
        audio, audio_lengths = pad_sequences([e["audio"] for e in examples])
        vision, vision_lengths = pad_sequences([e["vision"] for e in examples])
        return Batch(
            input_ids=torch.from_numpy(split.input_ids[indices, :tokens].astype(np.int64)),
            attention_mask=torch.from_numpy(mask[:, :tokens].astype(np.int64)),
            token_type_ids=torch.from_numpy(split.token_type_ids[indices, :tokens].astype(np.int64)),
            audio=audio,
            audio_lengths=audio_lengths,
            vision=vision,
            vision_lengths=vision_lengths,
            labels=torch.from_numpy(split.labels[indices].astype(np.float32)),
            ids=[split.ids[i] for i in indices],
        )

    return collate


def make_loader(
    split: StoreSplit,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over a split; shuffling is seeded so runs repeat exactly. `num_workers`
    processes collate batches ahead of the model (kept across epochs); `pin_memory` for a GPU."""
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(
        SplitDataset(split),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        collate_fn=make_collate(split),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
