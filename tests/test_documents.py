"""Document boundaries (DOC_MASK): masked attention never crosses a BOS, so no document's scores depend on an
earlier one; and the R6/R7 model pieces (parallel lanes, skip gates, attention gate) keep the model causal."""
from __future__ import annotations

import pytest
import torch

from conftest import BOS, tg, tiny_config, tiny_model

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
    with torch.no_grad():  # a later token that leaked would move a logit by over 1; CPU sum order moves them ~1e-6
        torch.testing.assert_close(model(ids, cu_seqlens=model.segments(ids))[:, :20],
                                   model(later, cu_seqlens=model.segments(later))[:, :20], rtol=1e-4, atol=1e-4)
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
