"""Model properties: causality, and no information crossing a BOS through SmearGate or BigramHash."""
from __future__ import annotations

import pytest
import torch

from conftest import BOS, tg, tiny_config, tiny_model

VOCAB = tiny_config()["vocab_size"]


def random_ids(batch: int, seq: int, seed: int, low: int = 3) -> torch.Tensor:
    """Random non-control token ids (no BOS unless placed explicitly)."""
    return torch.randint(low, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# causality of the whole model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xsa_last_n, num_loops", [(0, 0), (1, 0), (2, 0), (2, 2)])
@torch.no_grad()
def test_gpt_is_causal(xsa_last_n, num_loops):
    """Changing tokens after position t leaves the logits at positions <= t unchanged (also with block 0
    run three times by depth recurrence)."""
    model = tiny_model(seed=3, xsa_last_n=xsa_last_n, num_loops=num_loops)
    seq = 48
    for trial in range(4):
        x = random_ids(2, seq, seed=100 + trial)
        x[0, 20] = BOS  # a document boundary in the middle of one row
        t = [0, 7, 20, 31][trial]
        y = x.clone()
        y[:, t + 1:] = random_ids(2, seq - t - 1, seed=200 + trial)
        a, b = model(x), model(y)
        assert a.shape == (2, seq, VOCAB)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)  # the change is visible later


@torch.no_grad()
def test_gpt_loss_outputs():
    """reduction='none' gives per-token NLL equal to cross-entropy of the logits; 'mean' averages it."""
    model = tiny_model(seed=4)
    x, y = random_ids(2, 16, seed=1), random_ids(2, 16, seed=2)
    logits = model(x)
    nll = model(x, y, reduction="none")
    assert nll.shape == (2, 16)
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x, y), nll.mean(), rtol=1e-6, atol=1e-6)
    assert float(logits.abs().max()) <= 30.0  # tanh softcap


@torch.no_grad()
def test_residual_stream_follows_autocast():
    """Under bf16 autocast every block reads and writes a bf16 residual stream (the records' dtype,
    half the memory traffic of fp32); without autocast it stays fp32, and the loss is fp32 either way.
    (Sequential blocks here, so every block runs its forward; the parallel lanes are checked at the head.)"""
    model = tiny_model(seed=5, num_loops=1, parallel_start=0)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, inputs, out: seen.append((inputs[0].dtype, inputs[1].dtype, out.dtype)))
    x, y = random_ids(2, 16, seed=1), random_ids(2, 16, seed=2)
    assert model(x, y).dtype == torch.float32
    assert seen and set(seen) == {(torch.float32,) * 3}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    assert loss.dtype == torch.float32
    assert len(seen) == len(model.orders[True]) and set(seen) == {(torch.bfloat16,) * 3}
    lanes = tiny_model(seed=5, num_loops=1)
    head_input = []
    lanes.final_norm.register_forward_hook(lambda _m, inputs, _out: head_input.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lanes(x, y)
    assert lanes.lane_merge is not None and head_input == [torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# SmearGate
# ----------------------------------------------------------------------------------------------


def test_smear_gate_respects_bos_and_position_zero():
    """Output equals input at position 0 and at every BOS; elsewhere it is the blend with x_{t-1}."""
    torch.manual_seed(0)
    smear = tg.SmearGate(8, BOS)
    with torch.no_grad():
        smear.gate.copy_(torch.randn(8))
    x = torch.randn(2, 6, 8)
    ids = torch.tensor([[5, 6, BOS, 7, 8, BOS], [BOS, 9, 10, 11, 12, 13]])
    out = smear(x, ids)
    g = torch.sigmoid(smear.gate)
    for b in range(2):
        for t in range(6):
            if t == 0 or ids[b, t] == BOS:
                assert torch.equal(out[b, t], x[b, t]), (b, t)
            else:
                expected = x[b, t] + g * (x[b, t - 1] - x[b, t])
                torch.testing.assert_close(out[b, t], expected)
                assert not torch.allclose(out[b, t], x[b, t])


# ----------------------------------------------------------------------------------------------
# BigramHash
# ----------------------------------------------------------------------------------------------


def test_bigram_buckets_reserved_and_in_range():
    """Position 0 and every BOS use bucket buckets-1; all others lie in [0, buckets-2], also for ids
    near the uint16 limit (where 36313 * id overflows int32)."""
    for buckets in (2, 64, 3072):
        bigram = tg.BigramHash(buckets, 4, 8, BOS)
        ids = torch.randint(0, 65536, (3, 50), generator=torch.Generator().manual_seed(buckets))
        ids[ids == BOS] = 2
        ids[:, 10] = BOS
        ids[1, 30:] = 65535
        b = bigram.bucket_ids(ids)
        assert b.dtype == torch.int64 and b.shape == ids.shape
        reserved = torch.zeros_like(ids, dtype=torch.bool)
        reserved[:, 0] = True
        reserved[:, 10] = True
        assert bool((b[reserved] == buckets - 1).all())
        assert bool((b[~reserved] >= 0).all()) and bool((b[~reserved] <= buckets - 2).all())


def test_bigram_bucket_is_hash_of_pair():
    """Away from boundaries a bucket is (36313*cur XOR 27191*prev) mod (buckets-1)."""
    bigram = tg.BigramHash(64, 4, 8, BOS)
    ids = torch.tensor([[9, 17, 300, 4]])
    b = bigram.bucket_ids(ids)[0].tolist()
    assert b[1] == ((36313 * 17) ^ (27191 * 9)) % 63
    assert b[2] == ((36313 * 300) ^ (27191 * 17)) % 63
    assert b[3] == ((36313 * 4) ^ (27191 * 300)) % 63


def test_bigram_buckets_local_and_causal():
    """A bucket depends only on (prev, cur) and never on later tokens; at a BOS, not on the token before."""
    bigram = tg.BigramHash(64, 4, 8, BOS)
    x = random_ids(4, 40, seed=5)
    x[:, 25] = BOS
    base = bigram.bucket_ids(x)
    for t in (3, 24, 30):
        y = x.clone()
        y[:, t] = (y[:, t] + 1 - 3) % (VOCAB - 3) + 3  # a different non-BOS token
        changed = bigram.bucket_ids(y)
        assert torch.equal(changed[:, :t], base[:, :t])        # earlier buckets untouched
        assert torch.equal(changed[:, t + 2:], base[:, t + 2:])  # only the pairs (t-1,t), (t,t+1)
        if t == 24:  # token right before the BOS
            assert torch.equal(changed[:, 25], base[:, 25])
        else:
            assert not torch.equal(changed[:, t], base[:, t])


# ----------------------------------------------------------------------------------------------
# whole model: nothing from the previous document reaches a BOS position's input
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_no_mixing_into_bos_position():
    """With a BOS at position p, tokens before p change neither the bigram contribution nor the smeared
    embedding (x0) at p, while they do change them at an ordinary position."""
    model = tiny_model(seed=6)
    captured = {}
    model.smear.register_forward_hook(lambda _m, _i, out: captured.__setitem__("x0", out))
    p = 17
    x = random_ids(2, 32, seed=7)
    x[:, p] = BOS
    y = x.clone()
    y[:, :p] = random_ids(2, p, seed=8)
    assert not torch.equal(x[:, p - 1], y[:, p - 1])

    model(x)
    x0_x, big_x = captured["x0"], model.bigram(x)
    model(y)
    x0_y, big_y = captured["x0"], model.bigram(y)
    assert big_x.abs().sum() > 0 and model.smear.gate.abs().sum() > 0  # both paths are live
    assert torch.equal(big_x[:, p], big_y[:, p])
    assert torch.equal(x0_x[:, p], x0_y[:, p])
    # sensitivity: at p-1 (an ordinary token whose predecessor changed) both do change
    assert not torch.allclose(big_x[:, p - 1], big_y[:, p - 1])
    assert not torch.allclose(x0_x[:, p - 1], x0_y[:, p - 1])
    # position p+1 sees only BOS and itself through smear/bigram, so it is unchanged too
    assert torch.equal(x0_x[:, p + 1], x0_y[:, p + 1])
