#!/usr/bin/env python3
"""Benchmark causal GQA attention kernels (forward + backward) and check them against fp32 math.

usage: python3 bench/attention.py [--batch 48 --seq 2048 --heads 8 --kv-heads 4 --head-dim 64]
Prints one row per variant: median ms per forward+backward and relative error vs the fp32 reference.
Needs a CUDA GPU.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def sdpa(q, k, v, expand: bool):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if expand:
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    dev = torch.device("cuda")
    shape_q = (a.batch, a.seq, a.heads, a.head_dim)
    shape_kv = (a.batch, a.seq, a.kv_heads, a.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(shape_q, device=dev, dtype=torch.bfloat16)
    small = [t[:2].detach().float() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(*small, expand=True)
    print(f"B{a.batch} T{a.seq} H{a.heads}/KV{a.kv_heads} D{a.head_dim}, bf16, fwd+bwd")
    print(f"{'variant':32s} {'ms':>8s} {'rel err':>9s}")
    for name, backends in [("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("flash", [SDPBackend.FLASH_ATTENTION]),
                           ("efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
        for expand in (False, True):
            label = f"{name} ({'expanded kv' if expand else 'enable_gqa'})"
            try:
                with sdpa_kernel(backends):
                    out = sdpa(*(t[:2].detach() for t in (q, k, v)), expand=expand).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    ms = do_bench(lambda: sdpa(q, k, v, expand).backward(g), warmup=50, rep=300,
                                  return_mode="median")
                print(f"{label:32s} {ms:8.3f} {err:9.2e}")
            except RuntimeError as e:
                print(f"{label:32s} {'n/a':>8s} ({str(e).splitlines()[0][:60]})")


if __name__ == "__main__":
    main()
