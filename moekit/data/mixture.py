"""The order in which a mixture of datasets is visited: deterministic for a given seed and epoch.

- `concat`: every sample of every dataset once per epoch, shuffled together (file order for evaluation).
- `weighted`: each draw picks a dataset with probability proportional to its weight, then that dataset's next
  sample (a reshuffled pass through it, so small datasets repeat and large ones are covered evenly).
- `interleave`: like weighted, but the dataset sequence is a smooth weighted round-robin instead of random draws,
  so every window of the sequence holds the datasets in their weight ratio (weights 2:1 give A A B A A B ...).

Weighted and interleaved epochs have `num_samples` draws (default: the total size of the datasets).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _round_robin(weights: Sequence[float], count: int) -> list[int]:
    """Smooth weighted round-robin (as in nginx): the dataset index of each of `count` draws."""
    total = float(sum(weights))
    current = [0.0] * len(weights)
    out = []
    for _ in range(count):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        out.append(best)
    return out


def mixture_order(
    sizes: Sequence[int],
    weights: Sequence[float],
    mixing: str,
    seed: int,
    epoch: int = 0,
    num_samples: int | None = None,
    shuffle: bool = True,
) -> list[tuple[int, int]]:
    """(dataset, sample) pairs for one epoch."""
    if len(sizes) != len(weights):
        raise ValueError("one weight per dataset")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    live = [i for i, n in enumerate(sizes) if n > 0]
    if not live:
        return []
    if mixing == "concat" or not shuffle:
        pairs = [(d, i) for d in live for i in range(sizes[d])]
        if shuffle:
            pairs = [pairs[j] for j in torch.randperm(len(pairs), generator=generator).tolist()]
        return pairs
    count = num_samples if num_samples is not None else sum(sizes)
    live_weights = [weights[d] for d in live]
    if mixing == "weighted":
        probs = torch.tensor(live_weights, dtype=torch.float64)
        picks = torch.multinomial(probs, count, replacement=True, generator=generator).tolist()
    elif mixing == "interleave":
        picks = _round_robin(live_weights, count)
    else:
        raise ValueError(f"unknown mixing {mixing!r}; choose weighted, interleave or concat")
    cursors = {d: _Cycle(sizes[d], generator) for d in live}
    return [(live[p], cursors[live[p]].next()) for p in picks]


class _Cycle:
    """Endless reshuffled passes over range(n)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.order = n, generator, []

    def next(self) -> int:
        if not self.order:
            self.order = torch.randperm(self.n, generator=self.generator).tolist()[::-1]
        return self.order.pop()


class MixtureSampler(Sampler[int]):
    """Yields flat indices (dataset offset + sample) in `mixture_order`; `set_epoch` reshuffles (DDP-style)."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        mixing: str,
        seed: int = 0,
        num_samples: int | None = None,
        shuffle: bool = True,
    ):
        self.sizes, self.weights, self.mixing = list(sizes), list(weights), mixing
        self.seed, self.num_samples, self.shuffle = seed, num_samples, shuffle
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[tuple[int, int]]:
        return mixture_order(
            self.sizes, self.weights, self.mixing, self.seed, self.epoch, self.num_samples, self.shuffle
        )

    def __iter__(self) -> Iterator[int]:
        return iter([self.offsets[d] + i for d, i in self.order()])

    def __len__(self) -> int:
        if self.mixing == "concat" or not self.shuffle:
            return sum(self.sizes)
        return self.num_samples if self.num_samples is not None else sum(self.sizes)
