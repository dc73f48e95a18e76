#!/usr/bin/env python3
"""Benchmark causal GQA attention kernels (forward + backward) and check them against fp32 math.

usage: python3 bench/attention.py [--batch 48 --seq 2048 --heads 8 --kv-heads 4 --head-dim 64]
                                  [--shard data/bench_sp1024/fineweb_train_000000.bin]
Prints the seconds train_gpt.select_attention takes with ATTENTION=flash (import, smoke call and FA4's JIT
compilation of every kernel these shapes need, as at the start of a run), then one row per variant: median ms
per forward+backward, the seconds of its first call (compilation not done before: FlexAttention's, or FA4's
for the direct calls if any differs) and the relative error vs the fp32 reference. Dense variants
attend across documents; the document-masked ones (train_gpt.causal_attention with cu_seqlens, FlashAttention's
variable-length call, FlexAttention with a document mask) stop at every BOS of rows cut from --shard (random
tokens, i.e. almost no boundaries, without it). The FlashAttention rows (train_gpt's route with ATTENTION=flash,
and FA4's own functions called directly) print n/a, with the reason, where it is not installed. Needs a CUDA GPU.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def sdpa(q, k, v, expand: bool):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if expand:
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


def batch_ids(shard: str | None, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) token ids: random rows of a real shard (its BOS positions), or random tokens."""
    if not shard:
        return torch.randint(2, 1024, (batch, seq), device=device)
    tokens = tg.open_shard(shard)
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq, batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq] for s in starts]).astype(np.int64)).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--shard", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    shape_q = (a.batch, a.seq, a.heads, a.head_dim)
    shape_kv = (a.batch, a.seq, a.kv_heads, a.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(shape_q, device=dev, dtype=torch.bfloat16)
    ids = batch_ids(a.shard, a.batch, a.seq, dev)
    cu = tg.doc_segments(ids, 1)
    lengths = (cu[1:] - cu[:-1]).double()
    dense_pairs = a.batch * a.seq * (a.seq + 1) / 2
    print(f"B{a.batch} T{a.seq} H{a.heads}/KV{a.kv_heads} D{a.head_dim}, bf16, fwd+bwd; {len(cu) - 1} segments, "
          f"masked/dense attention pairs {float((lengths * (lengths + 1) / 2).sum()) / dense_pairs:.3f}")
    small = [t[:2].detach().float() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(*small, expand=True)
    cu_small = tg.doc_segments(ids[:2], 1)
    ref_masked = tg.causal_attention(*(t.cpu() for t in small), cu_small.cpu()).to(dev)
    doc = torch.cumsum(torch.zeros_like(ids).flatten().index_fill_(0, cu[1:-1].long(), 1), 0).view_as(ids)

    def document_causal(b, h, qi, ki):
        return (qi >= ki) & (doc[b, qi] == doc[b, ki])

    block_mask = create_block_mask(document_causal, a.batch, None, a.seq, a.seq, device=dev)
    flex = torch.compile(flex_attention)

    def run_flex(q_, k_, v_, mask=block_mask):
        return flex(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), block_mask=mask,
                    enable_gqa=True).transpose(1, 2)

    t0 = time.perf_counter()
    try:  # train_gpt's FlashAttention route as ATTENTION=flash sets it: import, smoke call, FA4's JIT at these shapes
        shapes = dict(num_heads=a.heads, num_kv_heads=a.kv_heads, model_dim=a.heads * a.head_dim, train_seq_len=a.seq)
        print("flash route:", tg.select_attention(tg.Hyperparameters(attention="flash", **shapes), dev),
              f"(select_attention: {time.perf_counter() - t0:.1f} s, FA4's JIT compilation included)")
        flash_routes, no_flash = dict(tg.ATTENTION_ROUTES), ""
    except RuntimeError as e:
        flash_routes, no_flash = None, f"{type(e.__cause__ or e).__name__}: {e.__cause__ or e}"
    tg.ATTENTION_ROUTES.update(dense=None, varlen=None)

    def route(flash: bool, masked: bool):
        """train_gpt.causal_attention with FlashAttention's or PyTorch's route forced."""
        def fn(q_, k_, v_, c):
            if flash and flash_routes is None:
                raise RuntimeError(no_flash)
            tg.ATTENTION_ROUTES.update(flash_routes if flash else dict(dense=None, varlen=None))
            try:
                with tg.autocast(dev):
                    return tg.causal_attention(q_, k_, v_, c if masked else None)
            finally:
                tg.ATTENTION_ROUTES.update(dense=None, varlen=None)
        return fn

    def fa4_direct(masked: bool):
        """FA4's own flash_attn_func / flash_attn_varlen_func (its autograd.Function, eager), not train_gpt's op."""
        def fn(q_, k_, v_, c):
            from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
            if not masked:
                return flash_attn_func(q_, k_, v_, causal=True)[0]
            t = q_.size(1)
            return flash_attn_varlen_func(*(x.flatten(0, 1) for x in (q_, k_, v_)), cu_seqlens_q=c, cu_seqlens_k=c,
                                          max_seqlen_q=t, max_seqlen_k=t, causal=True)[0].view_as(q_)
        return fn

    def sdpa_variant(backend, expand: bool):
        def fn(q_, k_, v_, c):
            with sdpa_kernel([backend]):
                return sdpa(q_, k_, v_, expand)
        return fn

    def flex_variant(q_, k_, v_, c):
        mask = create_block_mask(document_causal, 2, None, a.seq, a.seq, device=dev) if c is cu_small else block_mask
        return run_flex(q_, k_, v_, mask)

    variants = [(f"sdpa {name} ({'expanded kv' if e else 'enable_gqa'})", sdpa_variant(backend, e), False)
                for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)] for e in (False, True)]
    variants += [("dense pytorch (train_gpt route)", route(False, False), False),
                 ("dense flash (train_gpt route)", route(True, False), False),
                 ("dense fa4 flash_attn_func (direct)", fa4_direct(False), False),
                 ("doc-masked varlen_attn (train_gpt route)", route(False, True), True),
                 ("doc-masked flash (train_gpt route)", route(True, True), True),
                 ("doc-masked fa4 varlen_func (direct)", fa4_direct(True), True),
                 ("doc-masked flex", flex_variant, True)]
    print(f"{'variant':42s} {'ms':>8s} {'first s':>8s} {'rel err':>9s}")
    for label, fn, masked in variants:
        try:
            out = fn(*(t[:2].detach() for t in (q, k, v)), cu_small).float()
            want = ref_masked if masked else ref
            err = ((out - want).norm() / want.norm()).item()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(q, k, v, cu).backward(g)  # the first call at full size: compiles whatever it JIT-compiles
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = do_bench(lambda: fn(q, k, v, cu).backward(g), warmup=50, rep=300, return_mode="median")
            print(f"{label:42s} {ms:8.3f} {first:8.2f} {err:9.2e}")
        except Exception as e:  # a backend that does not run here, or FlashAttention not installed
            print(f"{label:42s} {'n/a':>8s} ({type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''})")


if __name__ == "__main__":
    main()
