"""The training sampler that keeps a VQA scene's questions together (one CNN pass per scene)."""
from __future__ import annotations

import numpy as np

from protozoo.engine import GroupedSampler, training_sampler


def runs(order, groups):
    """Number of maximal runs of consecutive items from one group."""
    g = groups[np.asarray(order)]
    return int(1 + (g[1:] != g[:-1]).sum())


def test_every_item_once_with_groups_contiguous():
    groups = np.repeat(np.arange(30), 20)[np.random.default_rng(0).permutation(600)]
    sampler = GroupedSampler(groups, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(600)) and len(sampler) == 600
    assert runs(order, groups) == 30  # each group's 20 items in one block


def test_seeded_by_epoch():
    groups = np.repeat(np.arange(10), 5)
    a, b = GroupedSampler(groups, seed=1), GroupedSampler(groups, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) != list(range(50))  # shuffled


def test_ranks_get_equal_disjoint_shares():
    groups = np.repeat(np.arange(7), 3)  # 21 items over 2 ranks: 11 each, one repeated
    parts = [list(GroupedSampler(groups, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    assert [len(p) for p in parts] == [11, 11]
    assert set(parts[0]) | set(parts[1]) == set(range(21))
    assert len(set(parts[0]) & set(parts[1])) <= 1


def test_plain_datasets_keep_the_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    class Plain:
        def __len__(self):
            return 10

    class Grouped(Plain):
        groups = np.arange(10) // 2

    assert isinstance(training_sampler(Plain(), 1, 0, 0), DistributedSampler)
    assert isinstance(training_sampler(Grouped(), 1, 0, 0), GroupedSampler)
