#!/usr/bin/env python3
"""Time TTT_MODE=lora (train_gpt.evaluate_lora_ttt, per-document score-first LoRA TTT) on one GPU and project it.

    python3 bench/ttt_lora.py [--artifact final_model.int6.ptz] [--docs 2000] [--json out.json]

Settings come from the environment as in train_gpt.py (DATA_PATH, TOKENIZER_PATH, TRAIN_SEQ_LEN, TTT_LORA_*, ...);
without --artifact the model is a random one of that configuration (timing only: its bpb means nothing). Runs
train_gpt's own evaluate_lora_ttt on the validation stream's first --docs documents and prints: compile warm-up
seconds and the number of graphs compiled, ms per step, tokens per second, the projected seconds of the pass for the
whole validation file (P300: 5.31 M tokens on one GPU) and for one rank's share of FineWeb's 62 M targets on 8 GPUs
(7.75 M targets, assuming the same document lengths: the file's documents repeated), and the bpb of those documents
with no TTT (the sliding pass), TTT_MODE=global and TTT_MODE=lora. Projections scale the measured loop time by the
schedule's row-tokens (steps x rows x row length, exact from lora_schedule), so they hold for any TTT_LORA_BUCKETS.
On CPU it runs eagerly (0 graphs) unless --compile-cpu (torch.compile with the aot_eager backend).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402

FINEWEB_RANK_TARGETS = 62_021_632 // 8  # one rank's share of the challenge's validation targets


def schedule_cost(lengths: torch.Tensor, args: tg.Hyperparameters) -> tuple[int, int]:
    """(steps, row-tokens) of evaluate_lora_ttt's schedule for documents of these lengths on one rank."""
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]))
    _, widths = tg.lora_schedule(starts, lengths, args.ttt_lora_docs, args.ttt_lora_chunk, args.lora_context,
                                 [args.lora_context >> i for i in range(args.ttt_lora_buckets)])
    return len(widths), sum(widths) * args.ttt_lora_docs


def repeated_lengths(lengths: torch.Tensor, targets: int) -> torch.Tensor:
    """The documents' lengths repeated in order until they hold `targets` targets, the last one cut."""
    reps = lengths.repeat(math.ceil(targets / int(lengths.sum())))
    reps = reps[: int(torch.searchsorted(reps.cumsum(0), torch.tensor(targets))) + 1].clone()
    reps[-1] -= int(reps.sum()) - targets
    return reps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="", help="a train_gpt artifact (default: a random model)")
    ap.add_argument("--docs", type=int, default=2000, help="documents timed (~60 s on an H100 at the defaults)")
    ap.add_argument("--compile-cpu", action="store_true", help="on CPU, compile with aot_eager (counts graphs)")
    ap.add_argument("--skip-global", action="store_true", help="no TTT_MODE=global comparison")
    ap.add_argument("--json", default="", help="write every number to this file")
    opts = ap.parse_args(argv)
    args, _ = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    device, log = rt.device, (lambda msg: print("  | " + msg, flush=True))
    print("attention", tg.select_attention(args, device))
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    tokens = tg.load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.train_seq_len,
                                       args.vocab_size)
    starts, lengths = tg.document_spans(tokens, sp.bos_id())
    docs = min(opts.docs, len(starts))
    sub = tokens[: int(starts[docs]) + 1] if docs < len(starts) else tokens
    bytes_per_target = tg.target_bytes(sub, tg.byte_tables(sp))
    sub = sub.to(device)
    if opts.artifact:
        model, _ = tg.load_artifact_model(opts.artifact, device)
    else:
        torch.manual_seed(args.seed)
        model = tg.GPT(**tg.model_config(args, sp.bos_id())).to(device)

    graphs, first_step = [], []
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager" if opts.compile_cpu else None

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.lookup_backend(compile_backend)(gm, example_inputs)

    real_compile, real_step = tg.maybe_compile, tg.lora_step
    if compile_backend:
        tg.maybe_compile = lambda module, device: torch.compile(module, dynamic=False, backend=backend)

    def timed_step(model_fn, lora, tokens_, *rest):
        if tokens_ is sub and not first_step:  # the first validation step: warm-up (compilation) is over
            tg.synchronize(device)
            first_step.append((time.perf_counter(), len(graphs)))
        return real_step(model_fn, lora, tokens_, *rest)

    tg.lora_step = timed_step
    print(f"lora pass: {docs} documents, {sub.numel() - 1} targets, rows {args.ttt_lora_docs} rank "
          f"{args.ttt_lora_rank} chunk {args.ttt_lora_chunk} lr {args.ttt_lora_lr} buckets {args.ttt_lora_buckets}")
    t0 = time.perf_counter()
    try:
        _, lora_bpb, _ = tg.evaluate_lora_ttt(model, sub, bytes_per_target, args, rt, log, math.inf)
        tg.synchronize(device)
    finally:
        tg.lora_step, tg.maybe_compile = real_step, real_compile
    t_end = time.perf_counter()
    (t_first, graphs_at_first), (steps, row_tokens) = first_step[0], schedule_cost(lengths[:docs], args)
    loop_s, warm_s = t_end - t_first, t_first - t0
    per_row_token = loop_s / row_tokens
    p300_steps, p300_cost = schedule_cost(lengths, args)
    fw_steps, fw_cost = schedule_cost(repeated_lengths(lengths, FINEWEB_RANK_TARGETS), args)
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", docs=docs,
               targets=sub.numel() - 1, steps=steps, graphs=len(graphs), graphs_after_warmup=len(graphs) - graphs_at_first,
               warmup_seconds=warm_s, loop_seconds=loop_s, ms_per_step=1000 * loop_s / steps,
               tokens_per_second=(sub.numel() - 1) / loop_s, row_tokens=row_tokens,
               p300=dict(targets=int(lengths.sum()), steps=p300_steps, seconds=per_row_token * p300_cost),
               fineweb_rank=dict(targets=FINEWEB_RANK_TARGETS, steps=fw_steps, seconds=per_row_token * fw_cost),
               settings={k: getattr(args, k) for k in ("ttt_lora_rank", "ttt_lora_lr", "ttt_lora_chunk",
                                                        "ttt_lora_docs", "ttt_lora_buckets", "ttt_lora_context")})
    print(f"compile warm-up {warm_s:.1f}s, graphs compiled {len(graphs)} ({out['graphs_after_warmup']} after warm-up)")
    print(f"loop {loop_s:.2f}s, {steps} steps, {out['ms_per_step']:.2f} ms/step, {out['tokens_per_second']:,.0f} "
          f"targets/s, {row_tokens / loop_s:,.0f} row-tokens/s (x{row_tokens / (sub.numel() - 1):.1f} padding+context)")
    for name in ("p300", "fineweb_rank"):
        p = out[name]
        print(f"projected {name}: {p['targets']:,} targets, {p['steps']} steps, {p['seconds']:.1f}s "
              f"(+ {warm_s:.1f}s compile warm-up)")

    model_fn = tg.maybe_compile(model, device)
    _, out["bpb_no_ttt"], _ = tg.evaluate(model_fn, sub, bytes_per_target, args.eval_stride, args, rt)
    out["bpb_lora"] = lora_bpb
    if not opts.skip_global:
        copy_ = copy.deepcopy(model)
        _, out["bpb_global"], _ = tg.evaluate_ttt(copy_, tg.maybe_compile(copy_, device), sub, bytes_per_target, args,
                                                  rt, log, math.inf)
    print("bpb of these documents: " + ", ".join(f"{k[4:]} {out[k]:.4f}" for k in ("bpb_no_ttt", "bpb_global",
                                                                                    "bpb_lora") if k in out))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
