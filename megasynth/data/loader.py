"""The training batch loader: rank-sliced, deterministic and resumable (docs/training.md, "The batch loader").

    loader = DistributedBatchLoader(dataset, global_batch_size=32, micro_batch_size=4, dp_rank=r, dp_size=2,
                                    fingerprint=dataset.fingerprint)
    for micro in loader.next_step():          # accumulation_steps micro-batches of one optimizer step
        loss = model(micro.input_ids, micro.labels, doc_ids=micro.doc_ids)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megasynth.data.blend import build_blended_dataset, parse_data_path

IGNORE_INDEX = -100


class LoaderStateError(ValueError):
    """A loader state that does not fit the current data (another blend, a position past the end)."""


@dataclass
class Batch:
    """One micro-batch on one rank: inputs and targets shifted by one token."""

    input_ids: torch.Tensor  # int64 [mb, S]
    labels: torch.Tensor  # int64 [mb, S], IGNORE_INDEX where there is nothing to predict
    doc_ids: torch.Tensor | None  # int32 [mb, S] segment ids (None without document masking)

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.doc_ids))


def sample_range(consumed: int, micro_step: int, *, micro_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """Dataset indices of one micro-batch of the step starting at sample `consumed`, for one dp rank."""
    start = consumed + micro_step * dp_size * micro_batch_size + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """global_batch_size / (micro_batch_size x dp); an error naming the three quantities when it does not divide."""
    per_pass = micro_batch_size * dp_size
    if global_batch_size % per_pass != 0:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not divisible by train.micro_batch_size="
            f"{micro_batch_size} x dp={dp_size} (dp = world size / parallel.tp): gradient accumulation "
            "needs a whole number of micro-batches per rank"
        )
    return global_batch_size // per_pass


def collate_samples(samples: Sequence[dict], document_masking: bool = True) -> Batch:
    """Stack samples of seq_len + 1 tokens into a Batch (inputs = tokens[:-1], labels = tokens[1:])."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False))
    labels = tokens[:, 1:].clone()
    if any("loss_mask" in s for s in samples):
        # loss_mask[j] marks token j as a target; the label at input position j is token j + 1, so it is kept
        # iff loss_mask[j + 1]. A blend mixes masked (SFT) and unmasked (replay) sources in one micro-batch:
        # a sample without a mask predicts every token.
        mask = torch.from_numpy(np.stack([np.asarray(s["loss_mask"], dtype=bool) if "loss_mask" in s
                                          else np.ones(len(s["tokens"]), dtype=bool) for s in samples]))
        labels[~mask[:, 1:]] = IGNORE_INDEX
    doc_ids = None
    if document_masking:
        doc_ids = torch.from_numpy(np.stack([s["doc_ids"] for s in samples]).astype(np.int32, copy=False))[:, :-1]
    return Batch(input_ids=tokens[:, :-1].contiguous(), labels=labels, doc_ids=doc_ids)


class _RankBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one rank, from `consumed` to the end (for DataLoader workers)."""

    def __init__(self, num_samples: int, consumed: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.num_samples, self.consumed, self.g = num_samples, consumed, global_batch_size
        self.mb, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.accum = accumulation_steps(global_batch_size, micro_batch_size, dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.consumed, self.num_samples - self.g + 1, self.g):
            for m in range(self.accum):
                yield list(sample_range(start, m, micro_batch_size=self.mb, dp_rank=self.dp_rank, dp_size=self.dp_size))

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.consumed) // self.g) * self.accum


class DistributedBatchLoader:
    """Yields, step by step, this rank's micro-batches of each global batch; resumable via state_dict()."""

    def __init__(self, dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, fingerprint: str = "", document_masking: bool = True,
                 device: torch.device | str = "cpu", num_workers: int = 0):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.accumulation_steps = accumulation_steps(global_batch_size, micro_batch_size, dp_size)
        self.fingerprint = fingerprint
        self.document_masking = document_masking
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.consumed = 0  # samples of the global batches already handed out (all ranks together)
        self._worker_iter = None

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch, on the loader's device; advances the position."""
        if self.consumed + self.global_batch_size > len(self.dataset):
            raise LoaderStateError(
                f"the training data holds {len(self.dataset)} samples; the step starting at sample {self.consumed} "
                f"needs {self.global_batch_size} more (was the dataset built for fewer steps?)"
            )
        if self.num_workers > 0:
            if self._worker_iter is None:
                self._worker_iter = iter(self._worker_loader())
            batches = [next(self._worker_iter) for _ in range(self.accumulation_steps)]
        else:
            ranges = (sample_range(self.consumed, m, micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size) for m in range(self.accumulation_steps))
            batches = [collate_samples([self.dataset[i] for i in r], self.document_masking) for r in ranges]
        self.consumed += self.global_batch_size
        non_blocking = self.device.type == "cuda"
        return [b.to(self.device, non_blocking=non_blocking) for b in batches]

    def _worker_loader(self) -> torch.utils.data.DataLoader:
        # Background processes assemble micro-batches ahead of the loop; the sampler fixes which indices each
        # micro-batch holds, so the result is the same as reading in the training process.
        sampler = _RankBatchSampler(len(self.dataset), self.consumed, self.global_batch_size, self.micro_batch_size,
                                    self.dp_rank, self.dp_size)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=functools.partial(collate_samples, document_masking=self.document_masking),
            pin_memory=self.device.type == "cuda", prefetch_factor=2 * self.accumulation_steps,
        )

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "fingerprint": self.fingerprint,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict, allow_fingerprint_change: bool = False) -> None:
        saved = state.get("fingerprint", "")
        if saved != self.fingerprint and not allow_fingerprint_change:
            raise LoaderStateError(
                f"the checkpoint was trained on data with fingerprint {saved!r}, the configured data has "
                f"{self.fingerprint!r} (sources, weights, seq_len or seed changed); set data.allow_blend_change=true "
                "to continue on the new data anyway"
            )
        consumed = int(state["consumed_samples"])
        if consumed > len(self.dataset):
            raise LoaderStateError(f"the checkpoint consumed {consumed} samples but the dataset holds {len(self.dataset)}")
        self.consumed = consumed
        self._worker_iter = None  # restart background workers at the new position


# -- datasets -------------------------------------------------------------------------------------------------------
def data_sources(data_cfg) -> list:
    """The training sources of `data_cfg` (a DataConfig): its [[data.sources]], else its data.data_path parsed."""
    sources = list(data_cfg.sources)
    if not sources and data_cfg.data_path:
        sources = parse_data_path(data_cfg.data_path)
    if not sources:
        raise ValueError("no training data: set data.data_path (or [[data.sources]]) to a dataset prefix")
    return sources


def build_train_dataset(data_cfg, *, num_samples: int, seed: int, cache_dir: str | os.PathLike):
    """The training dataset of `data_cfg` (a DataConfig): the weighted blend of its sources, with `.fingerprint`."""
    return build_blended_dataset(data_sources(data_cfg), seq_len=data_cfg.seq_len, num_samples=num_samples,
                                 seed=seed, cache_dir=cache_dir)
