"""TokenLoader: blocks are contiguous shard spans, batches are seeded, and world sizes agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import runtime, tg, write_shard

SEQ = 16


@pytest.fixture(scope="module")
def position_shards(tmp_path_factory):
    """Three shards whose token at each position is a unique value (shard 0 holds 0.., shard 1 10000..,
    shard 2 20000..), so a block's first token identifies it and contiguity is visible."""
    d = tmp_path_factory.mktemp("loader")
    for i, n in enumerate([300, 251, 190]):
        write_shard(d / f"fineweb_train_00000{i}.bin", np.arange(n) + 10_000 * i)
    return str(d / "fineweb_train_*.bin")


def loader(pattern, seqs, rank=0, world=1, seed=0):
    return tg.TokenLoader(pattern, SEQ, seqs, runtime(rank, world), seed, 65_536)


def test_batches_are_contiguous_blocks(position_shards):
    """Inputs and targets are (seqs, seq_len) int64, targets are inputs shifted by one, and each block is
    a contiguous span of one shard (never crossing a shard boundary), over several epochs."""
    ld = loader(position_shards, 4)
    total_blocks = sum((n - 1) // SEQ for n in (300, 251, 190))
    seen_epoch0 = []
    for step in range(3 * total_blocks // 4):
        x, y = ld.next_batch()
        assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert bool((y[:, -1] == x[:, -1] + 1).all())
        assert bool((x[:, 1:] - x[:, :-1] == 1).all())  # contiguous, and within one shard
        assert bool((x[:, 0] // 10_000 == y[:, -1] // 10_000).all())
        if ld.epoch == 0:
            seen_epoch0 += x[:, 0].tolist()
    # epoch 0 has phase 0: blocks start at multiples of SEQ and none repeats
    assert len(seen_epoch0) == len(set(seen_epoch0)) >= total_blocks - 3
    assert all((t % 10_000) % SEQ == 0 for t in seen_epoch0)
    assert ld.epoch >= 1


@pytest.mark.parametrize("seqs_per_rank", [1, 3])
def test_two_ranks_split_the_one_gpu_batch(position_shards, seqs_per_rank):
    """For every step (through epoch changes) rank 0 + rank 1 = the world-size-1 batch, and they are disjoint."""
    single = loader(position_shards, 2 * seqs_per_rank)
    ranks = [loader(position_shards, seqs_per_rank, rank=r, world=2) for r in (0, 1)]
    for step in range(25):
        x1, y1 = single.next_batch()
        (x0a, y0a), (x0b, y0b) = (r.next_batch() for r in ranks)
        assert torch.equal(torch.cat([x0a, x0b]), x1) and torch.equal(torch.cat([y0a, y0b]), y1), step
        assert not set(x0a[:, 0].tolist()) & set(x0b[:, 0].tolist())
    assert single.epoch >= 1


def test_same_seed_same_batches_different_seed_differs(position_shards):
    a, b, c = (loader(position_shards, 3, seed=s) for s in (5, 5, 6))
    batches = [[ld.next_batch()[0] for _ in range(20)] for ld in (a, b, c)]
    assert all(torch.equal(p, q) for p, q in zip(batches[0], batches[1]))
    assert not all(torch.equal(p, q) for p, q in zip(batches[0], batches[2]))


def test_new_epoch_reshuffles_with_a_phase(position_shards):
    """After the first epoch, blocks are cut at a seeded random phase and served in a new order."""
    ld = loader(position_shards, 1, seed=3)
    first_epoch = []
    while ld.epoch == 0 and ld.cursor < ld.order.size:
        first_epoch.append(int(ld.next_batch()[0][0, 0]))
    phases = set()
    for _ in range(6):
        ld._new_epoch()
        phases.add(ld.phase)
        assert 0 <= ld.phase < SEQ
        epoch = [int(ld.next_batch()[0][0, 0]) for _ in range(len(first_epoch) - 3)]
        assert epoch != first_epoch
        assert all((t % 10_000 - ld.phase) % SEQ == 0 for t in epoch)
    assert len(phases) > 1
