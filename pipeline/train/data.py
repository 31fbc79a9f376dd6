"""What the training loop reads: a data order fixed by (seed, epoch) and the global batch, DataLoaders over
token samples (joined with their stored teacher features in distill mode), and validation batches.

The order does not depend on the number of ranks. Epoch e is one permutation of the split's positions drawn from
(seed, e); optimizer step k of the epoch takes the k-th block of G = micro_batch * grad_accum * world_size
positions; within it, micro-batch slot j = accum_index * world_size + rank holds positions [j*micro, (j+1)*micro).
So one rank with grad_accum=2 sees exactly the micro-batches that two ranks with grad_accum=1 see together, and
the data position saved in a checkpoint (epoch, step within the epoch) restarts the same sequence. The last
incomplete global batch of an epoch is dropped.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset positions) for steps start_step.. of one epoch."""

    def __init__(self, n: int, *, micro_batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 epoch: int = 0, start_step: int = 0, shuffle: bool = True) -> None:
        self.n, self.micro, self.accum = n, micro_batch_size, grad_accum
        self.world, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.epoch, self.start_step = epoch, start_step
        self.global_batch = micro_batch_size * grad_accum * world_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples cannot fill one global batch of {self.global_batch} "
                             f"(micro_batch_size x grad_accum x ranks); lower one of them or add data")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch
            for a in range(self.accum):
                slot = a * self.world + self.rank
                yield order[base + slot * self.micro: base + (slot + 1) * self.micro]

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accum


def make_dataset(tokens: Any, store: FeatureStore | None, layers: Sequence[Any], topk: bool) -> Any:
    return tokens if store is None else FeatureDataset(tokens, store, layers, topk=topk)


def make_collate(pad_id: int, with_features: bool) -> Any:
    from pipeline.data.prepared import collate_items

    return functools.partial(collate_with_features if with_features else collate_items, pad_id=pad_id)


def make_loader(dataset: Any, sampler: Sampler, collate: Any, *, num_workers: int, prefetch_factor: int,
                pin_memory: bool, seed: int) -> DataLoader:
    """Workers read and pad the next batches (features mmapped from the store) while the engine computes.

    The loader gets its own generator: by default a DataLoader draws its workers' seed from the global RNG when
    an iteration starts, which would shift the dropout draws of a resumed run against an uninterrupted one."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **extra)


def eval_batches(n: int, micro_batch_size: int, world_size: int, rank: int, limit: int = 0
                 ) -> list[tuple[list[int], bool]]:
    """This rank's validation micro-batches as (positions, counts): every rank gets the same number of batches
    (ZeRO-3 forwards are collective), padded with a repeat of position 0 whose result is not counted."""
    total = n if limit <= 0 else min(n, limit)
    mine = list(range(rank, total, world_size))
    per_rank = -(-total // world_size)
    n_batches = -(-per_rank // micro_batch_size)
    batches = [(mine[i * micro_batch_size:(i + 1) * micro_batch_size], True) for i in range(n_batches)]
    return [(b, True) if b else ([0], False) for b, _ in batches]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return {k: move(v) for k, v in batch.items()}
