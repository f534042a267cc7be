"""Which samples each step reads: a deterministic, resumable, rank-sharded order.

The sample stream of a run is the concatenation of epoch orders: epoch ``e`` is a permutation of
the dataset seeded by (seed, e) (``epoch_order``). Step ``k`` takes the global batch
``stream[k*G : (k+1)*G]`` (batches run across epoch boundaries) and rank ``r`` reads the slice
``rank_slice(G, r, W)`` = ``[floor(G*r/W), floor(G*(r+1)/W))`` of it: ``[r*B, (r+1)*B)`` when
W divides G (B = G / W), shares differing by at most one sample otherwise. So

- the ranks of one step read disjoint samples, and together one global batch;
- each epoch visits every sample exactly once over all ranks (batches span epoch ends);
- the samples of step k depend only on (seed, k, rank, world size): a run resumed at step k
  reads exactly what an uninterrupted run reads from step k on.

Both loaders (PyTorch and DALI) take their order from :class:`StepBatchSampler`.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["StepBatchSampler", "eval_shard", "mix_seed", "random_order", "rank_slice"]

Key = Tuple[int, int]  # (sample index, epoch)


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64-style), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def rank_slice(global_batch: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(start, stop) of rank ``rank``'s share of a global batch of ``global_batch`` samples:
    ``[floor(G*r/W), floor(G*(r+1)/W))``. The shares are contiguous, cover the batch, and differ
    in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if global_batch < world_size:
        raise ValueError(f"global batch size {global_batch} is smaller than world_size={world_size}: "
                         "every rank needs at least one sample per step")
    return global_batch * rank // world_size, global_batch * (rank + 1) // world_size


def random_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The default epoch order: a uniform permutation of range(num_items) seeded by (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches of steps ``start_step, start_step + 1, ...`` as lists of
    ``(index, epoch)`` keys (see the module docstring).

    Args:
        num_items: dataset size (>= 1).
        batch_size: per-rank batch size B (with ``global_batch_size``: this rank's share of it).
        seed: base seed of the epoch orders.
        start_step: first step to yield (resume point).
        num_steps: how many steps to yield; None = endless.
        rank, world_size: this process's place among ``world_size`` data-parallel ranks.
        order: ``order(epoch) -> LongTensor`` permutation of range(num_items); default
            :func:`random_order` with ``seed`` (tar shards use a block order, see sources.py).
        global_batch_size: G, when it is not ``batch_size * world_size``: rank r then reads
            ``rank_slice(G, r, W)`` of each global batch and ``batch_size`` must be its length.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0,
                 num_steps: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 order: Optional[Callable[[int], torch.Tensor]] = None, global_batch_size: Optional[int] = None):
        if num_items < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, {num_steps}")
        self.n, self.batch, self.seed = int(num_items), int(batch_size), int(seed)
        self.start_step, self.num_steps = int(start_step), num_steps
        self.rank, self.world_size = int(rank), int(world_size)
        self._order = order if order is not None else (lambda e: random_order(self.n, self.seed, e))
        if global_batch_size is None:
            self.global_batch, self.offset = self.batch * self.world_size, self.rank * self.batch
        else:
            lo, hi = rank_slice(int(global_batch_size), self.rank, self.world_size)
            if hi - lo != self.batch:
                raise ValueError(f"rank {rank}'s share of a global batch of {global_batch_size} is {hi - lo} "
                                 f"samples, not batch_size={batch_size}")
            self.global_batch, self.offset = int(global_batch_size), lo

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._order(epoch)
        if perm.numel() != self.n:
            raise ValueError(f"epoch order has {perm.numel()} entries, expected {self.n}")
        return perm

    def __iter__(self) -> Iterator[List[Key]]:
        global_batch = self.global_batch
        # position in the stream of this rank's first sample of the first step
        pos = self.start_step * global_batch + self.offset
        step, perm, perm_epoch = 0, None, -1
        while self.num_steps is None or step < self.num_steps:
            keys: List[Key] = []
            while len(keys) < self.batch:
                epoch, offset = divmod(pos, self.n)
                if perm_epoch != epoch:
                    perm, perm_epoch = self._perm(epoch), epoch
                take = min(self.batch - len(keys), self.n - offset)
                keys += [(int(i), epoch) for i in perm[offset:offset + take]]
                pos += take
            yield keys
            step += 1
            pos += global_batch - self.batch  # skip the other ranks' slices

    def __len__(self) -> int:
        return self.num_steps if self.num_steps is not None else sys.maxsize


def eval_shard(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of sample indices rank ``rank`` reads in an evaluation pass:
    [floor(n * r / W), floor(n * (r + 1) / W)), DALI's own shard_id/num_shards split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)
