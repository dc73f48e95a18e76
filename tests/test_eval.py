"""Evaluation: sliding windows score every target once with enough context, and the sliding pass scores each target
from its window (the TTT pass's legality: tests/test_lora_ttt.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import docs_tokens, runtime, tg, tiny_config, tiny_model

# ----------------------------------------------------------------------------------------------
# sliding windows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_targets, seq_len, stride", [
    (64, 64, 64), (64, 64, 16), (65, 64, 16), (100, 32, 8), (130, 32, 32), (1000, 64, 32), (1000, 64, 64),
    (333, 48, 16), (200, 16, 1),
])
def test_sliding_windows_cover_each_target_once(n_targets, seq_len, stride):
    """Targets 0..n-1 are each scored exactly once, in stream order; every window lies inside the
    stream; every scored target after the first window sees at least seq_len - stride tokens before it."""
    starts, score_from = tg.sliding_windows(n_targets, seq_len, stride)
    assert starts.dtype == score_from.dtype == torch.int64 and starts.shape == score_from.shape
    assert int(starts[0]) == 0 and int(score_from[0]) == 0
    count = torch.zeros(n_targets, dtype=torch.int64)
    next_target = 0
    for i, (s, f) in enumerate(zip(starts.tolist(), score_from.tolist())):
        assert 0 <= s and s + seq_len <= n_targets  # inputs s..s+seq_len-1, targets up to s+seq_len-1
        assert 0 <= f < seq_len
        if i > 0:
            assert f >= seq_len - stride  # context of the first scored target (and more for later ones)
        assert s + f == next_target  # windows continue exactly where the previous one stopped
        count[s + f: s + seq_len] += 1
        next_target = s + seq_len
    assert next_target == n_targets
    assert bool((count == 1).all())


def test_sliding_windows_too_short():
    with pytest.raises(ValueError, match="validation has 31 targets, fewer than one 32-token window"):
        tg.sliding_windows(31, 32, 16)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (3, 8), (0, 2)])
def test_rank_slice_partitions(n, world):
    """The ranks' slices are contiguous, disjoint and together cover range(n)."""
    covered = []
    for rank in range(world):
        covered += list(range(n))[tg.rank_slice(n, runtime(rank, world))]
    assert covered == list(range(n))


# ----------------------------------------------------------------------------------------------
# fixtures for scoring
# ----------------------------------------------------------------------------------------------

SEQ, STRIDE = 32, 16


def eval_args(**overrides) -> tg.Hyperparameters:
    kw = dict(vocab_size=tiny_config()["vocab_size"], train_seq_len=SEQ, eval_stride=STRIDE, eval_batch_seqs=4)
    kw.update(overrides)
    args = tg.Hyperparameters(**kw)
    args.validate()
    return args


@pytest.fixture(scope="module")
def val(tokenizer):
    """2,049 tokens (2,048 targets) of BOS-separated documents, and their byte counts."""
    tokens = torch.from_numpy(docs_tokens(tokenizer.sp, 2049, seed=21).astype("int64"))
    return tokens, tg.target_bytes(tokens, tg.byte_tables(tokenizer.sp)), tokenizer.sp


@pytest.fixture(scope="module")
def base_model():
    return tiny_model(seed=31)


# ----------------------------------------------------------------------------------------------
# plain evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_evaluate_scores_each_target_from_its_window(val, base_model):
    """board.nll[j] is the NLL the model gives target j inside the window that scores it."""
    tokens, bpt, _ = val
    args = eval_args(eval_batch_seqs=3)  # the last batch is padded
    loss, bpb, board = tg.evaluate(base_model, tokens, bpt, STRIDE, args, runtime())
    n = tokens.numel() - 1
    assert board.nll.shape == (n,) and bool((board.count == 1).all())
    expected = torch.zeros(n)
    starts, score_from = tg.sliding_windows(n, SEQ, STRIDE)
    for s, f in zip(starts.tolist(), score_from.tolist()):
        nll = base_model(tokens[None, s: s + SEQ], tokens[None, s + 1: s + SEQ + 1], reduction="none")[0]
        expected[s + f: s + SEQ] = nll[f:]
    torch.testing.assert_close(board.nll, expected, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(float(expected.double().mean()), rel=1e-6)
    assert bpb == pytest.approx(tg.bits_per_byte(float(expected.double().sum()), int(bpt.sum())), rel=1e-6)
