#!/usr/bin/env python3
"""Benchmark causal GQA attention kernels (forward + backward) and check them against fp32 math.

usage: python3 bench/attention.py [--batch 48 --seq 2048 --heads 8 --kv-heads 4 --head-dim 64]
                                  [--shard data/bench_sp1024/fineweb_train_000000.bin]
Prints one row per variant: median ms per forward+backward and relative error vs the fp32 reference.
Dense variants attend across documents; the document-masked ones (train_gpt.causal_attention with
cu_seqlens, and FlexAttention with a document mask) stop at every BOS of rows cut from --shard
(random tokens, i.e. almost no boundaries, without it). Needs a CUDA GPU.
"""
import argparse
import os
import sys

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

    print(f"{'variant':40s} {'ms':>8s} {'rel err':>9s}")
    variants = [(f"sdpa {name} ({'expanded kv' if e else 'enable_gqa'})", [backend], e)
                for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)] for e in (False, True)]
    for label, backends, expand in variants:
        try:
            with sdpa_kernel(backends):
                out = sdpa(*(t[:2].detach() for t in (q, k, v)), expand=expand).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: sdpa(q, k, v, expand).backward(g), warmup=50, rep=300, return_mode="median")
            print(f"{label:40s} {ms:8.3f} {err:9.2e}")
        except RuntimeError as e:
            print(f"{label:40s} {'n/a':>8s} ({str(e).splitlines()[0][:60]})")
    masked = [("doc-masked varlen (train_gpt)", lambda q_, k_, v_, c: tg.causal_attention(q_, k_, v_, c)),
              ("doc-masked flex", lambda q_, k_, v_, c: run_flex(q_, k_, v_, create_block_mask(
                  document_causal, 2, None, a.seq, a.seq, device=dev) if c is cu_small else block_mask))]
    for label, fn in masked:
        out = fn(*(t[:2].detach() for t in (q, k, v)), cu_small).float()
        err = ((out - ref_masked).norm() / ref_masked.norm()).item()
        ms = do_bench(lambda: fn(q, k, v, cu).backward(g), warmup=50, rep=300, return_mode="median")
        print(f"{label:40s} {ms:8.3f} {err:9.2e}")


if __name__ == "__main__":
    main()
