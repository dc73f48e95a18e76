"""Document boundaries: masked attention never crosses a BOS, and per-document LoRA TTT is legal (every
target scored once, before any update that saw it, and no document's scores depend on another document)."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from conftest import BOS, docs_tokens, runtime, tg, tiny_config, tiny_model

# ----------------------------------------------------------------------------------------------
# segments and masked attention
# ----------------------------------------------------------------------------------------------


def test_doc_segments_start_at_rows_and_bos():
    ids = torch.tensor([[BOS, 5, 6, BOS, 7], [8, 9, BOS, BOS, 4]])
    assert tg.doc_segments(ids, BOS).tolist() == [0, 3, 5, 7, 8, 10]


def test_masked_attention_equals_attention_per_document():
    """With cu_seqlens, each segment's outputs equal causal attention run on that segment alone."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g)
    cu = torch.tensor([0, 5, 12, 13, 20, 24], dtype=torch.int32)  # row 0: 0-4, 5-11; row 1: 0, 1-7, 8-11
    y = tg.causal_attention(q, k, v, cu).flatten(0, 1)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = tg.causal_attention(*(t[None, a:b] for t in flat))[0]
        torch.testing.assert_close(y[a:b], alone, rtol=1e-5, atol=1e-6)
    dense = tg.causal_attention(q, k, v).flatten(0, 1)
    assert not torch.allclose(y[5:12], dense[5:12], atol=1e-3)  # the mask does something


@pytest.mark.parametrize("doc_mask", [True, False])
def test_doc_mask_isolates_documents(doc_mask):
    """With doc_mask, changing the first document of a row leaves the logits of the second document
    unchanged (attention, SmearGate and BigramHash all stop at BOS); without it they change."""
    model = tiny_model(seed=3, doc_mask=doc_mask, parallel_start=1, skip_gates=True, attn_gate=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (1, 40), generator=g)
    ids[0, 0], ids[0, 17] = BOS, BOS
    other = ids.clone()
    other[0, 1:17] = torch.randint(3, 300, (16,), generator=g)
    with torch.no_grad():
        a = model(ids, cu_seqlens=model.segments(ids))
        b = model(other, cu_seqlens=model.segments(other))
    assert torch.equal(a[0, 17:], b[0, 17:]) == doc_mask


def test_model_pieces_are_causal_and_start_neutral():
    """Parallel lanes, skip gates and the attention gate keep the model causal; a fresh attention gate is
    the identity (2 sigmoid(0) = 1), and a fresh skip gate blends half and half."""
    model = tiny_model(seed=4, num_layers=4, parallel_start=2, skip_gates=True, attn_gate=True, doc_mask=True)
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    later = ids.clone()
    later[:, 20:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cu_seqlens=model.segments(ids))[:, :20],
                                   model(later, cu_seqlens=model.segments(later))[:, :20])
    fresh = tg.GPT(**tiny_config(num_layers=4, parallel_start=2, skip_gates=True, attn_gate=True))
    x = torch.randn(1, 6, 64)
    attn = fresh.blocks[0].attn
    gated = attn(x)
    attn.gate = None
    torch.testing.assert_close(gated, attn(x))
    skip = torch.randn(1, 6, 64)
    torch.testing.assert_close(fresh.merge_skip(0, x, skip), 0.5 * x + 0.5 * skip)


def test_gpu_varlen_attention_matches_masked_sdpa():
    """On a GPU, variable-length FlashAttention and the masked SDPA reference agree within bf16 tolerance,
    outputs and q/k/v gradients."""
    if not torch.cuda.is_available() or tg.varlen_attn is None:
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (4, 256, 8, 64), (4, 256, 4, 64)
    qkv = [torch.randn(s, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
           for s in (shape_q, shape_kv, shape_kv)]
    ids = torch.randint(3, 1000, (4, 256), device="cuda", generator=g)
    ids[torch.rand(4, 256, device="cuda", generator=g) < 0.02] = BOS
    cu = tg.doc_segments(ids, BOS)
    fast = tg.causal_attention(*qkv, cu)
    grads_fast = torch.autograd.grad(fast.float().square().sum(), qkv)
    ref_in = [t.detach().float().requires_grad_() for t in qkv]
    mask_ref = tg.causal_attention(*(t.cpu() for t in ref_in), cu.cpu()).cuda()
    grads_ref = torch.autograd.grad(mask_ref.square().sum(), ref_in)
    assert ((fast.float() - mask_ref).norm() / mask_ref.norm()) < 1e-2
    for a, b in zip(grads_fast, grads_ref):
        assert ((a.float() - b).norm() / b.norm()) < 2e-2


# ----------------------------------------------------------------------------------------------
# per-document LoRA TTT
# ----------------------------------------------------------------------------------------------

SEQ, CHUNK = 32, 8


def lora_args(**overrides) -> tg.Hyperparameters:
    kw = dict(vocab_size=320, train_seq_len=SEQ, eval_stride=16, ttt_chunk_tokens=SEQ, ttt_mode="lora", ttt_lora_chunk=CHUNK, ttt_lora_rank=4,
              ttt_lora_docs=3, ttt_lora_lr=0.05, ttt_lora_wd=0.0)
    kw.update(overrides)
    args = tg.Hyperparameters(**kw)
    args.validate()
    return args


def run_lora(model, tokens, sp, args=None, deadline=None):
    lines = []
    deadline = time.perf_counter() + 1e6 if deadline is None else deadline
    bpt = tg.target_bytes(tokens, tg.byte_tables(sp))
    _, bpb, board = tg.evaluate_lora_ttt(copy.deepcopy(model), tokens, bpt, args or lora_args(), runtime(),
                                         lines.append, deadline)
    return board.nll, lines, bpb


@pytest.fixture(scope="module")
def stream(tokenizer):
    """About 900 targets of generated documents (a few dozen tokens each, some over TRAIN_SEQ_LEN)."""
    return torch.from_numpy(docs_tokens(tokenizer.sp, 900, seed=5).astype("int64")), tokenizer.sp


@pytest.fixture(scope="module")
def lora_model():
    return tiny_model(seed=8, doc_mask=True)


def test_document_spans_partition_targets(stream):
    tokens, _ = stream
    starts, lengths = tg.document_spans(tokens, BOS)
    assert int(starts[0]) == 0 and int(lengths.sum()) == tokens.numel() - 1
    assert torch.equal(starts[1:], starts[:-1] + lengths[:-1])
    assert bool((tokens[starts[1:]] == BOS).all()) and int(lengths.max()) > SEQ


def test_lora_ttt_scores_every_target_once_and_adapts(stream, lora_model):
    """Each target is scored once; a document's first chunk is scored before any update, so it equals
    scoring that chunk with the plain model; later chunks use adapted weights."""
    tokens, sp = stream
    nll, lines, _ = run_lora(lora_model, tokens, sp)
    assert any(line.startswith("ttt_lora documents ") for line in lines), lines
    starts, lengths = tg.document_spans(tokens, BOS)
    changed = 0
    with torch.no_grad():
        for s, n in zip(starts.tolist(), lengths.tolist()):
            window = tokens[s : s + min(n, SEQ) + 1]
            plain = lora_model(window[None, :-1], window[None, 1:], "none")[0]
            k = min(n, CHUNK)
            torch.testing.assert_close(nll[s : s + k], plain[:k], rtol=1e-5, atol=1e-5)
            changed += int(n > CHUNK and not torch.allclose(nll[s + CHUNK : s + min(n, SEQ)], plain[CHUNK:], atol=1e-6))
    assert changed > 5


def test_lora_ttt_documents_are_independent_and_causal(stream, lora_model):
    """Replacing one document's tokens changes no other document's scores; replacing everything after
    target t changes no score at or before t. (The second edit also changes which documents share a
    batch, which moves matrix-product rounding by ~1e-7: hence the tolerance, far below any real leak.)"""
    tokens, sp = stream
    reference, _, _ = run_lora(lora_model, tokens, sp)
    starts, lengths = tg.document_spans(tokens, BOS)
    d = 4
    s, n = int(starts[d]), int(lengths[d])
    other = tokens.clone()
    other[s + 1 : s + n] = torch.randint(3, 300, (n - 1,), generator=torch.Generator().manual_seed(3))
    nll, _, _ = run_lora(lora_model, other, sp)
    assert torch.equal(nll[: s], reference[: s]) and torch.equal(nll[s + n :], reference[s + n :])
    assert not torch.equal(nll[s : s + n], reference[s : s + n])
    t = int(starts[9]) + 13
    cut = tokens.clone()
    cut[t + 2 :] = torch.randint(3, 300, (tokens.numel() - t - 2,), generator=torch.Generator().manual_seed(4))
    nll, _, _ = run_lora(lora_model, cut, sp)
    torch.testing.assert_close(nll[: t + 1], reference[: t + 1], rtol=0, atol=1e-5)
    assert (nll[t + 1 :] - reference[t + 1 :]).abs().max() > 0.1


def test_lora_ttt_deadline_scores_without_adapting(stream, lora_model):
    tokens, sp = stream
    nll, lines, _ = run_lora(lora_model, tokens, sp, deadline=time.perf_counter() - 1)
    assert any(line.startswith("ttt_deadline: adaptation stops after 1 document groups") for line in lines), lines
    frozen, _, _ = run_lora(lora_model, tokens, sp, args=lora_args(ttt_lora_lr=0.0))
    first_group_end = int(tg.document_spans(tokens, BOS)[0][3])
    torch.testing.assert_close(nll[first_group_end:], frozen[first_group_end:], rtol=1e-5, atol=1e-5)
