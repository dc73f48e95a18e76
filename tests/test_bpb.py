"""bpb accounting: the per-token byte rule (byte_tables / target_bytes) and bits_per_byte."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import BOS, CPU, encode_documents, make_documents, runtime, tg


def ids_of(sp, *pieces):
    ids = [sp.piece_to_id(p) for p in pieces]
    assert all(i != sp.unk_id() for i in ids), f"missing piece among {pieces}"
    return ids


def test_byte_tables_by_hand(tokenizer):
    """Per-piece values written out by hand for pieces the tiny tokenizer is forced to contain."""
    sp = tokenizer.sp
    base, space, boundary = tg.byte_tables(sp)
    assert base.dtype == np.int64 and space.dtype == bool and boundary.dtype == bool
    assert base.shape == space.shape == boundary.shape == (sp.vocab_size(),)
    golf, cafe, bare_space, byte_c3 = ids_of(sp, "\u2581golf", "café", "\u2581", "<0xC3>")
    assert (base[golf], space[golf], boundary[golf]) == (4, True, False)      # "golf" + optional space
    assert (base[cafe], space[cafe], boundary[cafe]) == (5, False, False)     # c a f + 2-byte é
    assert (base[bare_space], space[bare_space]) == (0, True)                 # just the space
    assert (base[byte_c3], space[byte_c3], boundary[byte_c3]) == (1, False, False)
    for control in (sp.unk_id(), sp.bos_id(), sp.eos_id()):
        assert (base[control], space[control], boundary[control]) == (0, False, True)
    # every byte-fallback piece is worth exactly one byte
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(base[i] == 1 for i in byte_ids)


def test_target_bytes_by_hand(tokenizer):
    """The leading space counts unless the previous token is a boundary (BOS, unk); control tokens are 0."""
    sp = tokenizer.sp
    golf, cafe, bare_space, byte_c3 = ids_of(sp, "\u2581golf", "café", "\u2581", "<0xC3>")
    unk = sp.unk_id()
    stream = torch.tensor([BOS, golf, golf, cafe, bare_space, byte_c3, BOS, golf, unk, golf])
    expected = [
        4,  # golf after BOS: no space byte
        5,  # golf after golf: space + 4
        5,  # café (no leading space)
        1,  # bare "▁" after café: the space itself
        1,  # byte-fallback token
        0,  # BOS
        4,  # golf after BOS again
        0,  # unk
        4,  # golf after unk (a boundary): no space byte
    ]
    got = tg.target_bytes(stream, tg.byte_tables(sp))
    assert got.dtype == torch.int64
    assert got.tolist() == expected


def test_target_bytes_matches_decoded_text(tokenizer):
    """For generated documents (with byte-fallback characters), the bytes credited to a document's
    tokens after its BOS equal the UTF-8 length of the decoded document."""
    sp = tokenizer.sp
    tables = tg.byte_tables(sp)
    docs = make_documents(120, seed=77, rare_prob=0.08) + ["日本 café 🙂 über naïve jalapeño €5 — 1999", "golf"]
    n_byte_tokens, total = 0, 0
    for ids in sp.encode(docs):
        n_byte_tokens += sum(sp.is_byte(i) for i in ids)
        got = int(tg.target_bytes(torch.tensor([BOS] + ids), tables).sum())
        expected = len(sp.decode(ids).encode("utf-8"))
        assert got == expected, sp.decode(ids)
        total += expected
    assert n_byte_tokens > 50  # the check really covered byte fallback
    # ... and over the whole BOS-separated stream, as the evaluation computes it
    stream = torch.from_numpy(encode_documents(sp, docs).astype(np.int64))
    assert int(tg.target_bytes(stream, tables).sum()) == total


def test_bits_per_byte_by_hand():
    """A uniform guess over 256 values at one byte per token is 8 bits per byte; 2 nats/byte is 2/ln 2."""
    assert tg.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0, rel=1e-12)
    assert tg.bits_per_byte(10.0, 5) == pytest.approx(2.0 / math.log(2.0), rel=1e-12)
    # tokens of 4 bytes each, 2.0 nats per token -> 0.5 nats per byte
    assert tg.bits_per_byte(200 * 2.0, 200 * 4) == pytest.approx(0.5 / math.log(2.0), rel=1e-12)


def test_scoreboard_finalize():
    """finalize returns (mean NLL, total bits / total bytes) and refuses unscored or double-scored targets."""
    board = tg.ScoreBoard(4, CPU)
    board.nll[:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    board.count[:] = 1
    loss, bpb = board.finalize(torch.tensor([1, 2, 3, 4]), runtime())
    assert loss == pytest.approx(2.5)
    assert bpb == pytest.approx(10.0 / math.log(2.0) / 10)
    for counts in ([1, 0, 1, 1], [1, 2, 1, 1]):
        board.count[:] = torch.tensor(counts, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="1 targets not scored exactly once"):
            board.finalize(torch.tensor([1, 2, 3, 4]), runtime())
