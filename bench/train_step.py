#!/usr/bin/env python3
"""Time and profile train_gpt.py's training step on random tokens (one GPU, no data needed).

usage: TRAIN_BATCH_TOKENS=98304 python3 bench/train_step.py [--steps 30] [--profile-steps 5] [--shard FILE]
The model and batch come from the same environment variables as train_gpt.py (one micro-batch
per step); with --shard the rows are cut from a real shard, so DOC_MASK=1 sees real documents.
ATTENTION=auto|flash|sdpa picks the attention route as in train_gpt.py (printed first, with the seconds it
took: FA4's JIT compilation happens there). Prints the seconds of the first step (torch.compile), median ms for a
full step, for forward+backward alone and for the optimizer steps alone, model TFLOP/s, then the CUDA
kernels that take the most time. The model runs the
extra passes of depth recurrence when NUM_LOOPS > 0 (the default); NUM_LOOPS=0 times the 11-pass
phase that precedes LOOP_FROM in training.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def matmul_flops_per_token(model: tg.GPT, seq_len: int, looping: bool) -> float:
    """Training FLOPs per token: 6 x (linear weights, each block's once per pass, + tied head)
    + 6 x passes x seq_len x dim (causal attention), with or without the extra passes."""
    order = model.orders[looping]
    block = [sum(p.numel() for p in tg.linear_weights(b)) for b in model.blocks]
    matrix = sum(block[i] for i in order) + model.bigram.proj.weight.numel() + model.tok_emb.weight.numel()
    return 6.0 * matrix + 6.0 * len(order) * seq_len * model.tok_emb.weight.size(1)


def timed(fn, steps: int) -> float:
    """Median milliseconds of fn() over `steps` calls, timed with CUDA events."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--shard", default="")
    a = ap.parse_args()
    args, _ = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    t0 = time.perf_counter()
    route = tg.select_attention(args, rt.device)
    print(f"attention {route} (chosen in {time.perf_counter() - t0:.1f} s, FA4's JIT compilation included)")
    model = tg.GPT(**tg.model_config(args, bos_id=1)).to(rt.device)
    net = tg.wrap_for_training(model, rt)
    opts = tg.build_optimizers(model, args, rt)
    seqs = args.train_batch_tokens // (rt.world_size * args.train_seq_len)

    tokens = torch.from_numpy(tg.open_shard(a.shard).astype("int64")).to(rt.device) if a.shard else None

    def batch():
        if tokens is None:
            r = torch.randint(0, args.vocab_size, (seqs, args.train_seq_len + 1), device=rt.device)
        else:
            starts = torch.randint(0, len(tokens) - args.train_seq_len - 1, (seqs, 1), device=rt.device)
            r = tokens[starts + torch.arange(args.train_seq_len + 1, device=rt.device)]
        return [(r[:, :-1], r[:, 1:])]

    def step():
        tg.train_step(net, model, opts, batch(), args.grad_clip_norm, rt)

    def forward_backward():
        (x, y), = batch()
        with tg.autocast(rt.device):
            net(x, y, cu_seqlens=model.segments(x)).backward()
        model.zero_grad(set_to_none=True)

    def optimizers_only():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for opt in opts:
            opt.step()

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"first step {time.perf_counter() - t0:.1f} s (compilation)")
    for _ in range(9):
        step()
    full = timed(step, a.steps)
    fwd_bwd = timed(forward_backward, a.steps)
    opt_ms = timed(optimizers_only, a.steps)
    flops = matmul_flops_per_token(model, args.train_seq_len, model.looping) * seqs * args.train_seq_len
    print(f"tokens/step {seqs * args.train_seq_len}  params {sum(p.numel() for p in model.parameters())}")
    print(f"full step {full:.2f} ms ({flops / full / 1e9:.0f} TFLOP/s)  forward+backward {fwd_bwd:.2f} ms  "
          f"optimizers {opt_ms:.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.profile_steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=160))


if __name__ == "__main__":
    main()
