"""Evaluation: sliding windows score every target once with enough context, and score-first TTT is legal
(a target's score never depends on tokens after the chunk it belongs to)."""
from __future__ import annotations

import copy
import time

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

SEQ, STRIDE, CHUNK = 32, 16, 64


def eval_args(**overrides) -> tg.Hyperparameters:
    kw = dict(vocab_size=tiny_config()["vocab_size"], train_seq_len=SEQ, eval_stride=STRIDE, eval_batch_seqs=4,
              ttt_chunk_tokens=CHUNK, ttt_epochs=1, ttt_lr=0.05, ttt_momentum=0.9, ttt_batch_seqs=2,
              ttt_grad_clip=1.0)
    kw.update(overrides)
    args = tg.Hyperparameters(**kw)
    args.validate()
    return args


@pytest.fixture(scope="module")
def val(tokenizer):
    """2,049 tokens (2,048 targets = 32 TTT chunks) of BOS-separated documents, and their byte counts."""
    tokens = torch.from_numpy(docs_tokens(tokenizer.sp, 2049, seed=21).astype("int64"))
    return tokens, tg.target_bytes(tokens, tg.byte_tables(tokenizer.sp)), tokenizer.sp


@pytest.fixture(scope="module")
def base_model():
    return tiny_model(seed=31)


def fresh(model):
    return copy.deepcopy(model).eval()


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


# ----------------------------------------------------------------------------------------------
# score-first TTT
# ----------------------------------------------------------------------------------------------


def run_ttt(model, tokens, bytes_per_target, args, deadline=None):
    lines = []
    deadline = time.perf_counter() + 1e6 if deadline is None else deadline
    loss, bpb, board = tg.evaluate_ttt(model, model, tokens, bytes_per_target, args, runtime(), lines.append, deadline)
    return loss, bpb, board, lines


@pytest.fixture(scope="module")
def ttt_runs(val, base_model):
    """TTT on the real tokens, and on the same tokens with everything after chunk K replaced by noise."""
    tokens, bpt, sp = val
    args = eval_args()
    k = 15
    cut = (k + 1) * CHUNK  # targets 0..cut-1 are chunks 0..k; they read tokens 0..cut
    noisy = tokens.clone()
    noisy[cut + 1:] = torch.randint(3, args.vocab_size, (tokens.numel() - cut - 1,),
                                    generator=torch.Generator().manual_seed(0))
    first = run_ttt(fresh(base_model), tokens, bpt, args)
    second = run_ttt(fresh(base_model), noisy, tg.target_bytes(noisy, tg.byte_tables(sp)), args)
    plain = tg.evaluate(fresh(base_model), tokens, bpt, STRIDE, args, runtime())
    return dict(k=k, cut=cut, first=first, second=second, plain=plain, n=tokens.numel() - 1)


def test_ttt_scores_every_target_once(ttt_runs):
    _, _, board, lines = ttt_runs["first"]
    assert board.nll.numel() == ttt_runs["n"] == 2048
    assert bool((board.count == 1).all())
    assert any(line.startswith("ttt chunks 32 trained 31 ") for line in lines), lines


def test_ttt_never_sees_the_future(ttt_runs):
    """Replacing every token after chunk k leaves the scores of chunks 0..k bit-identical."""
    cut = ttt_runs["cut"]
    a, b = ttt_runs["first"][2].nll, ttt_runs["second"][2].nll
    assert torch.equal(a[:cut], b[:cut])
    for c in range(ttt_runs["k"] + 1, ttt_runs["n"] // CHUNK):
        assert not torch.equal(a[c * CHUNK:(c + 1) * CHUNK], b[c * CHUNK:(c + 1) * CHUNK]), c


@pytest.mark.parametrize("last_kept", [9 * CHUNK + 5, 12 * CHUNK + 37, 20 * CHUNK])
def test_ttt_score_depends_only_on_the_past(val, base_model, ttt_runs, last_kept):
    """Stronger form, cutting inside a chunk: with every token after target `last_kept` replaced, the
    scores of targets 0..last_kept are unchanged (a chunk is scored before it is trained on)."""
    tokens, bpt, sp = val
    noisy = tokens.clone()
    noisy[last_kept + 2:] = torch.randint(3, 320, (tokens.numel() - last_kept - 2,),
                                          generator=torch.Generator().manual_seed(1))
    _, _, board, _ = run_ttt(fresh(base_model), noisy, tg.target_bytes(noisy, tg.byte_tables(sp)), eval_args())
    reference = ttt_runs["first"][2].nll
    assert torch.equal(board.nll[: last_kept + 1], reference[: last_kept + 1])
    assert not torch.equal(board.nll[last_kept + 1:], reference[last_kept + 1:])


def test_ttt_first_chunk_is_plain_scoring_and_later_chunks_adapt(ttt_runs):
    """Chunk 0 is scored before any update (identical to sliding evaluation); every later chunk is scored
    by an adapted model, which on this repetitive text predicts the second half better."""
    ttt, plain = ttt_runs["first"][2].nll, ttt_runs["plain"][2].nll
    assert torch.equal(ttt[:CHUNK], plain[:CHUNK])
    for c in range(1, ttt_runs["n"] // CHUNK):
        assert not torch.equal(ttt[c * CHUNK:(c + 1) * CHUNK], plain[c * CHUNK:(c + 1) * CHUNK]), c
    half = ttt_runs["n"] // 2
    assert float(ttt[half:].mean()) < float(plain[half:].mean())


def test_ttt_deadline_stops_training(val, base_model):
    """With the deadline already passed, TTT trains on the first chunk only, says so, and still scores all."""
    tokens, bpt, _ = val
    _, _, board, lines = run_ttt(fresh(base_model), tokens, bpt, eval_args(), deadline=time.perf_counter() - 1)
    assert bool((board.count == 1).all())
    assert any(line.startswith("ttt_deadline: stopping adaptation after 1 chunks") for line in lines), lines
    assert any(line.startswith("ttt chunks 32 trained 1 ") for line in lines), lines
