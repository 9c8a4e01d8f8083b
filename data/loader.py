"""Deterministic, resumable, rank-aware data loading.

Order: epoch e's permutation comes from `torch.Generator().manual_seed(seed + epoch)`, so it
depends on nothing but (seed, epoch). Rank r takes items r, r + W, r + 2W, ... of it.
Resume: the training loop counts the batches this rank consumed in the current epoch and
calls `sampler.set_start_batch(batches, batch_size)` after `set_epoch(epoch)` (items here:
batches * batch_size); the loader then yields exactly the rest of the uninterrupted epoch.
Buckets (`data.buckets`): `make_bucket_loader`, batches of one shape from
`data.buckets.BucketBatchSampler`, with the same protocol.
Call `set_epoch(loader, epoch)` (below) at the start of each epoch: it moves both the
sampler and the dataset (whose crops and flips depend on the epoch) to the new epoch.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import UserError
from utils.train_utils import worker_seed

PREFETCH_BATCHES = 2  # batches each worker keeps ready


class EpochSampler(Sampler):
    """What both samplers share: the epoch whose order is drawn, and a start offset (items or
    batches, `per_rank` of them per epoch) for resuming mid-epoch."""
    per_rank: int

    def __init__(self):
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.per_rank - self.start

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order; a new epoch starts from its first item."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch


class ResumableSampler(EpochSampler):
    """Per-epoch permutation, a strided slice per rank, and a start offset for resuming.

    With drop_last every rank gets num_items // world_size items (the tail is dropped);
    without it, ceil(num_items / world_size), the order wrapping around to pad, so all ranks
    run the same number of steps.
    """

    def __init__(self, num_items: int, *, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank} must be in [0, world_size = {world_size})")
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.rank, self.world_size = rank, world_size
        div = num_items / world_size
        self.per_rank = math.floor(div) if drop_last else math.ceil(div)  # items per epoch
        super().__init__()

    def epoch_order(self) -> list[int]:
        """This rank's items for the current epoch, in order, before `set_start`."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        total = self.per_rank * self.world_size
        if total > self.num_items:  # pad by wrapping around (num_items > 0 here)
            order = order.repeat(math.ceil(total / self.num_items))
        return order[:total][self.rank::self.world_size].tolist()

    def __iter__(self):
        return iter(self.epoch_order()[self.start:])

    def set_start(self, index: int) -> None:
        """Skip the first `index` items (not batches) of this rank's order for this epoch."""
        if not 0 <= index <= self.per_rank:
            raise ValueError(f"start = {index} must be in [0, {self.per_rank}]")
        self.start = index

    def set_start_batch(self, batches: int, batch_size: int) -> None:
        """Skip the first `batches` batches of `batch_size` items (mid-epoch resume)."""
        self.set_start(batches * batch_size)


def _seed_worker(worker_id: int) -> None:
    """Seed python and numpy in a worker from the seed torch gave it (base_seed + worker_id)."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def fewer_than_one_batch(num_items: int, batch_size: int, world_size: int = 1) -> UserError:
    """The error for a dataset that gives a process less than one batch of `batch_size`."""
    per_rank = num_items // world_size
    per = f" ({per_rank} per process over {world_size} processes)" if world_size > 1 else ""
    return UserError(f"the dataset has {num_items} items{per}, fewer than one batch of "
                     f"{batch_size}; lower train.batch_size, or add clips / lower "
                     "data.window_stride to get more windows")


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int,
                num_workers: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool = True, device_type: str = "cpu",
                collate_fn: Optional[Callable[[list], dict]] = None) -> DataLoader:
    """A DataLoader over `dataset` with a `ResumableSampler` (at `loader.sampler`).

    Batches: {"video": (B, 3, T, H, W), "label": (B,)} for this repo's datasets (`collate_fn`,
    e.g. the conditioning seam's, may add to them; it runs in the data workers). drop_last
    applies to both the rank split and the last incomplete batch.
    """
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size, drop_last=drop_last)
    if sampler.per_rank == 0 or (drop_last and sampler.per_rank < batch_size):
        raise fewer_than_one_batch(len(dataset), batch_size, world_size)
    workers = dict(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES) if num_workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=device_type == "cuda", collate_fn=collate_fn,
                      worker_init_fn=_seed_worker,
                      # seeds the workers (base_seed + worker_id), differently on each rank
                      generator=torch.Generator().manual_seed(worker_seed(seed, rank)), **workers)


def make_bucket_loader(dataset: Dataset, sampler: Sampler, *, seed: int, num_workers: int = 0,
                       rank: int = 0, device_type: str = "cpu",
                       collate_fn: Optional[Callable[[list], dict]] = None) -> DataLoader:
    """A DataLoader whose batches come from `sampler` (a `data.buckets.BucketBatchSampler`,
    at `loader.batch_sampler`): one bucket's shape per batch. Workers as `make_loader`'s."""
    workers = dict(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES) if num_workers else {}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=device_type == "cuda", collate_fn=collate_fn, worker_init_fn=_seed_worker,
                      generator=torch.Generator().manual_seed(worker_seed(seed, rank)), **workers)


def position_sampler(loader: DataLoader):
    """What orders `loader`'s epoch (set_epoch, set_start_batch, per_rank): its batch sampler
    when that is one of ours (buckets), else its sampler."""
    return loader.batch_sampler if hasattr(loader.batch_sampler, "set_epoch") else loader.sampler


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Move the sampler (order) and the dataset (augmentation), if it has one, to `epoch`."""
    position_sampler(loader).set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def batches_per_epoch(loader: DataLoader) -> int:
    """Batches in a full epoch on this rank (ignoring any `set_start` offset)."""
    if loader.batch_size is None:  # a batch sampler: it counts batches
        return position_sampler(loader).per_rank
    per_rank, bs = loader.sampler.per_rank, loader.batch_size
    return per_rank // bs if loader.drop_last else math.ceil(per_rank / bs)
