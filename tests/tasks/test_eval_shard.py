"""Evaluation splits are cut into unpadded strided shards under DDP, for both tasks' data kinds."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from distkd.data.base import Split
from distkd.engine import distributed
from distkd.tasks.common import eval_shard


def test_shards_of_all_ranks_cover_an_in_memory_split_exactly_once(monkeypatch):
    split = Split(torch.arange(7 * 4, dtype=torch.uint8).view(7, 1, 2, 2), torch.arange(7))
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    labels = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shard = eval_shard(split)
        assert torch.equal(shard.images, split.images[rank::3])
        labels += shard.labels.tolist()
    assert sorted(labels) == list(range(7))  # 3 + 2 + 2: no sample repeated to even out the shards


def test_file_datasets_get_a_strided_subset_and_one_process_the_whole_split(monkeypatch):
    dataset = TensorDataset(torch.arange(5))
    assert eval_shard(dataset) is dataset
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert [int(dataset[i][0]) for i in eval_shard(dataset).indices] == [1, 3]
