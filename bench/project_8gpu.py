#!/usr/bin/env python3
"""Project the contest run (8 GPUs: 600 s of training, 600 s of evaluation) from measurements on one GPU.

    python3 bench/project_8gpu.py [--artifact final_model.int6.ptz] [--comm-json comm.json] [--json out.json]
    torchrun --standalone --nproc_per_node=2 bench/project_8gpu.py --comm --out comm.json   # NCCL, 2 GPUs

This GPU plays one rank of an 8-rank run (`--world-size`), running train_gpt.py's own functions with a fake
Runtime(rank, world_size=8): rank 0 for training (every rank does the same work), and for evaluation the rank
with the most work (busiest_rank: ranks wait for each other only at the final all-reduce, and with TTT the
ranks' step counts differ). Every per-rank shape is the 8-GPU one (one micro-batch of 98,304 tokens,
Muon's share of the Newton-Schulz work, 1/8 of the evaluation windows, 1/8 of the documents for TTT), nothing
is scaled linearly from one-GPU times.

The evaluation is run()'s: the pre-quant pass (the float model) and the round-trip pass (the reloaded
artifact), both at stride TRAIN_SEQ_LEN, then the final pass: TTT (evaluate_ttt: per-document LoRA TTT, each
rank on its consecutive documents, up to TTT_LORA_DOCS at a time, their windows packed into one lora_step of
TTT_LORA_ROWS x TRAIN_SEQ_LEN tokens a step, scoring every target itself) or, with TTT_ENABLED=0 only, the plain
sliding pass (evaluate at EVAL_STRIDE).

Measured here: the training step of both graphs (train_gpt.train itself, with DDP removed), GPTQ,
packing the artifact (rANS + zstd-22), loading it, compilation and warm-up of the scoring graph, the time of one
score batch in each plain pass and, with TTT, from train_gpt.evaluate_ttt itself run on the stand-in stream as
that rank and stopped after its first 2 + --sample-steps steps (StepStamps): its set-up (documents, schedule,
adapters), the compile + warm-up of its LoRA graph, and the time of one step adapting and of one step only
scoring (the same sampled steps run again with adapting=False: what steps cost once the deadline stops
adaptation). Counted exactly, on the stand-in stream of 62,021,632 targets (DATA_PATH's validation tokens
tiled; their documents set TTT's work): how many score batches each rank runs in each plain pass and, with TTT,
its documents and rank_lora_plan's steps. Modelled: every all-reduce. `train_gpt.all_reduce` is replaced by a
stand-in that communicates nothing and records the bytes; a ring model turns bytes into seconds, which are
ADDED to the measured times (no overlap with compute assumed); DDP's gradient all-reduce is modelled from the
bytes DDP would reduce. TTT's adapters are per rank, so it makes no all-reduce per step: only its score
board's, as every pass. The evaluation timeline, TTT's deadline rule included, is then replayed by running
train_gpt's evaluate / evaluate_ttt on a virtual clock that the measured unit times advance (lora_step is a
stand-in that costs a step adapting or scoring only, as evaluate_ttt asks).
`--full` also runs that rank's whole share of every pass (TTT's whole plan too, its deadline set from the
projected time before it), as a check of the sampled projection.

The compiler cache starts empty (a fresh contest machine) unless --keep-inductor-cache.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402  (the code being projected)

CONTEST_TARGETS = 62_021_632  # FineWeb validation targets of the challenge (30,284 x 2048)
BOS_ID = 1  # every challenge tokenizer's BOS (train_gpt reads it from the tokenizer)
# Defaults without --comm-json. NCCL's maintainer gives ~370 GB/s as the effective NVLink bus bandwidth of
# 8xH100 SXM with the ring algorithm, i.e. with NVLink SHARP off as train_gpt sets it
# (github.com/NVIDIA/nccl-tests/issues/212); this run's messages (1-250 MB) stay below that peak, so we
# assume two thirds of it. The latency is a guess (70 us for an 8-rank all-reduce of a few bytes): --comm
# measures both.
DEFAULT_BUSBW_GBS = 250.0
DEFAULT_HOP_LATENCY_US = 5.0
DDP_BUCKET_BYTES = (dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * 1024 * 1024)  # DDP's defaults: 1 MiB, then 25 MiB


# ----------------------------------------------------------------------------------------------
# communication: ring model and the all-reduce stand-in
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RingModel:
    """Seconds of one all-reduce of `nbytes` on `world` ranks with NCCL's ring algorithm:
    2(w-1)/w * nbytes / busbw + 2(w-1) * hop_latency (nccl-tests' bus-bandwidth convention).
    `table` (from --comm) holds the bus bandwidth measured for particular message sizes; other sizes
    use the one nearest in log size, or `busbw` when there is no table."""

    world: int
    busbw: float  # bytes/s
    hop_latency: float  # s
    table: dict = dataclasses.field(default_factory=dict)  # bytes -> busbw (bytes/s)
    source: str = "default"

    def bus_bandwidth(self, nbytes: int) -> float:
        if not self.table:
            return self.busbw
        return self.table[min(self.table, key=lambda b: abs(math.log(b) - math.log(max(nbytes, 1))))]

    def seconds(self, nbytes: int) -> float:
        w = self.world
        if w <= 1:
            return 0.0
        return 2 * (w - 1) / w * nbytes / self.bus_bandwidth(nbytes) + 2 * (w - 1) * self.hop_latency


class Ledger:
    """Stand-in for train_gpt.all_reduce on a fake rank: it communicates nothing and returns the tensor as
    it is (this rank's own contribution only), recording each call's bytes and the ring model's seconds.
    Those seconds are never slept: they are added to the pass that made the call. With a clock (virtual
    runs) the stand-in also advances that clock by them, so train_gpt's deadline rule sees them."""

    def __init__(self, ring: RingModel, clock=None):
        self.ring, self.clock, self.calls = ring, clock, []

    def __call__(self, t: torch.Tensor, rt=None, op=None) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        seconds = self.ring.seconds(nbytes)
        self.calls.append((nbytes, seconds))
        if self.clock is not None:
            self.clock.now += seconds
        return t

    def mark(self) -> int:
        return len(self.calls)

    def since(self, mark: int) -> tuple[int, int, float]:
        """(calls, bytes, modelled seconds) recorded after `mark`."""
        calls = self.calls[mark:]
        return len(calls), sum(b for b, _ in calls), sum(s for _, s in calls)


@contextlib.contextmanager
def patched(target, **attrs):
    """Temporarily set attributes of a module or class (restored on exit)."""
    old = {k: getattr(target, k) for k in attrs}
    for k, v in attrs.items():
        setattr(target, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(target, k, v)


def partial_finalize(self, bytes_per_target, rt):
    """ScoreBoard.finalize for a fake rank: the same two all-reduces, but no exactly-once check (it fails by
    design: only this rank's share of the targets is scored here) and no score (NaN)."""
    tg.all_reduce(self.nll, rt)
    tg.all_reduce(self.count, rt)
    return math.nan, math.nan


class SingleProcessDDP(nn.Module):
    """Stands in for wrap_for_training's DistributedDataParallel on a fake rank (it needs a process group):
    the compiled model, plus DDP's no_sync(), a no-op here. DDP's gradient all-reduce is modelled
    instead (`ddp_bucket_bytes`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()


def ddp_bucket_bytes(model: nn.Module) -> list[int]:
    """Bytes of each gradient all-reduce DDP makes per optimizer step: the fp32 gradients of every parameter
    (DDP reduces all that require grad), in DDP's buckets (1 MiB, then 25 MiB each) taken in reverse
    parameter order, about the order in which the backward pass produces them (DDP's rebuilt buckets)."""
    params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, list(DDP_BUCKET_BYTES), [False] * len(params))
    return [sum(params[i].numel() * params[i].element_size() for i in b) for b in buckets]


def ring_model(a) -> RingModel:
    """The ring model for --world-size ranks, from --comm-json if given, else --busbw-gbs / --hop-latency-us."""
    if a.comm_json:
        with open(a.comm_json) as f:
            comm = json.load(f)
        table = {m["bytes"]: m["busbw_gbs"] * 1e9 for m in comm["messages"] if m.get("busbw_gbs")}
        return RingModel(a.world_size, comm["busbw_gbs"] * 1e9, comm["hop_latency_s"], table,
                         f"{a.comm_json}: {comm['world_size']} x {comm['device']}, NCCL {comm['nccl']}, {comm['date']}")
    return RingModel(a.world_size, a.busbw_gbs * 1e9, a.hop_latency_us * 1e-6, {},
                     f"assumed (--busbw-gbs {a.busbw_gbs:g} --hop-latency-us {a.hop_latency_us:g})")


# ----------------------------------------------------------------------------------------------
# exact work counts and the virtual evaluation
# ----------------------------------------------------------------------------------------------


def passes(args: tg.Hyperparameters) -> tuple[str, ...]:
    """run()'s evaluation passes, in its order: pre-quant and round-trip (evaluate, stride TRAIN_SEQ_LEN), then
    the final one: "ttt" (evaluate_ttt: per-document LoRA TTT, which scores every target itself) or, only with
    TTT_ENABLED=0, "sliding" (evaluate, stride EVAL_STRIDE)."""
    return ("prequant", "roundtrip", "ttt" if args.ttt_enabled else "sliding")


def plain_passes(args: tg.Hyperparameters) -> tuple[str, ...]:
    """The passes that run train_gpt's evaluate (all but TTT)."""
    return tuple(p for p in passes(args) if p != "ttt")


def pass_stride(args: tg.Hyperparameters, name: str) -> int:
    """The window stride of a plain pass."""
    return args.eval_stride if name == "sliding" else args.train_seq_len


# work_counts' key of each plain pass's score batches (the pre-quant pass scores the round-trip pass's windows)
BATCH_KEYS = {"prequant": "roundtrip_batches", "roundtrip": "roundtrip_batches", "sliding": "sliding_batches"}


def work_counts(args: tg.Hyperparameters, tokens: torch.Tensor, world: int, rank: int = 0) -> dict:
    """What rank `rank` of `world` runs when evaluating the stream `tokens` ((n+1,) on CPU, n targets), from
    train_gpt's own functions: windows and score batches of EVAL_BATCH_SEQS windows of the round-trip pass
    (sliding_windows and rank_slice at stride TRAIN_SEQ_LEN; the pre-quant pass's too); then of the final pass:
    with TTT its documents and rank_lora_plan's steps (ttt_counts); with TTT_ENABLED=0 the windows and score batches
    of the sliding pass (EVAL_STRIDE)."""
    n, rt = tokens.numel() - 1, tg.Runtime(rank, world, 0, torch.device("cpu"))
    out = {"n_targets": n, "world_size": world, "rank": rank}
    out.update(window_counts(args, n, "roundtrip", rt))
    out.update(ttt_counts(args, tokens, rt) if args.ttt_enabled else window_counts(args, n, "sliding", rt))
    return out


def my_batches(args: tg.Hyperparameters, windows: int, rt: tg.Runtime) -> int:
    """Score batches of rank rt.rank's share (rank_slice) of `windows` windows."""
    return -(-len(range(windows)[tg.rank_slice(windows, rt)]) // args.eval_batch_seqs)


def window_counts(args: tg.Hyperparameters, n: int, name: str, rt: tg.Runtime) -> dict:
    """{name}_windows and {name}_batches of rank rt.rank in the plain pass `name`."""
    windows = len(tg.sliding_windows(n, args.train_seq_len, pass_stride(args, name))[0])
    return {f"{name}_windows": len(range(windows)[tg.rank_slice(windows, rt)]),
            f"{name}_batches": my_batches(args, windows, rt)}


def ttt_counts(args: tg.Hyperparameters, tokens: torch.Tensor, rt: tg.Runtime) -> dict:
    """TTT's work on rank rt.rank (train_gpt.rank_lora_plan, as evaluate_ttt uses it, for the environment's
    DOC_MASK): its documents (of all the stream's), its steps (each a lora_step of TTT_LORA_ROWS x TRAIN_SEQ_LEN
    tokens and TTT_LORA_DOCS window slots), the steps in which some window trains (the others only score: every
    window is on its document's last chunk), its windows (one per document chunk) and the most in one step, the
    targets it scores, and its row-tokens: read (window tokens) and computed (steps x rows x TRAIN_SEQ_LEN, padding
    included)."""
    mine, plan = tg.rank_lora_plan(tokens, virtual_model(args), args, rt)
    windows = (plan[:, :, 1] > 0).sum(1)
    return dict(ttt_documents=int(mine.sum()), ttt_all_documents=len(mine), ttt_steps=len(plan),
                ttt_training_steps=int(plan[:, :, 3].any(1).sum()), ttt_windows=int(windows.sum()),
                ttt_max_windows=int(windows.max()) if len(plan) else 0,
                ttt_targets=int((plan[:, :, 1] - plan[:, :, 2]).sum()),
                ttt_row_tokens_read=int(plan[:, :, 1].sum()),
                ttt_row_tokens=len(plan) * args.ttt_lora_rows * args.train_seq_len)


class VirtualClock:
    """Stands in for the `time` module inside train_gpt: perf_counter() reads a clock the stand-ins advance."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


class VirtualBoard:
    """Stands in for ScoreBoard in virtual runs: stores nothing; finalize makes the same two all-reduces
    (of meta tensors of the board's size: their bytes without the memory)."""

    def __init__(self, n: int, device):
        self.n = n

    def add(self, targets, nll) -> None:
        pass

    def finalize(self, bytes_per_target, rt):
        tg.all_reduce(torch.empty(self.n, device="meta"), rt)
        tg.all_reduce(torch.empty(self.n, dtype=torch.int32, device="meta"), rt)
        return math.nan, math.nan


class VirtualLoRA:
    """Stands in for DocumentLoRA in virtual runs: no adapters, no memory; remove does nothing."""

    def __init__(self, model, rows: int, docs: int, rank: int, device):
        pass

    def remove(self) -> None:
        pass


def virtual_model(args: tg.Hyperparameters):
    """What evaluate_ttt reads of the model in virtual runs (lora_step and DocumentLoRA being stand-ins): its BOS id,
    DOC_MASK (whether windows may share rows: rank_lora_plan) and its vocabulary size (the warm-up's random tokens)."""
    return types.SimpleNamespace(bos_id=BOS_ID, doc_mask=args.doc_mask,
                                 tok_emb=types.SimpleNamespace(num_embeddings=args.vocab_size))


def virtual_eval(args: tg.Hyperparameters, tokens: torch.Tensor, world: int, ring: RingModel, unit: dict,
                 before: dict, overhead: float, deadline: float, rank: int = 0) -> dict:
    """Replay rank `rank`'s evaluation of the stream `tokens` ((n+1,) on CPU; passes(args)) on a virtual clock, running
    train_gpt's own evaluate (pre-quant and round-trip: stride TRAIN_SEQ_LEN; sliding, without TTT: EVAL_STRIDE)
    and evaluate_ttt with its deadline rule.

    Stand-ins advance the clock: score_windows by its batches x unit[pass] (s per batch); lora_step by
    unit["ttt_warmup"] for evaluate_ttt's compile warm-up step (the one not on the stream), then by
    unit["ttt_adapting"] or unit["ttt_scoring"] (s per step) as evaluate_ttt asks it to adapt or only score; every
    all_reduce by the ring model (TTT makes none per step: only its finalize). before[pass] seconds (compression,
    compilation, loading; TTT's set-up) run ahead of a pass, `overhead` seconds (window set-up, finalize) after
    each. The clock starts at 0 when evaluation starts, so `deadline` is EVAL_MAX_SECONDS (or inf: what TTT needs
    without it). Returns per pass its seconds, score batches and all-reduce seconds; for TTT its steps, the steps
    run adapting, whether the deadline cut adaptation, and evaluate_ttt's log lines."""
    clock = VirtualClock()
    ledger = Ledger(ring, clock)
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"))
    now = {"pass": ""}
    counts = collections.Counter()

    def score_windows(model_fn, tokens, starts, score_from, batch, seq_len, board, device):
        batches = -(-len(starts) // batch)
        counts[now["pass"] + "_batches"] += batches
        clock.now += batches * unit[now["pass"]]

    def lora_step(model_fn, lora, step_tokens, plan, width, board, adapting, lr):
        if step_tokens is not tokens:  # the compile warm-up, on random tokens
            clock.now += unit["ttt_warmup"]
            return
        counts["ttt_steps"] += 1
        counts["ttt_adapted"] += adapting
        clock.now += unit["ttt_adapting" if adapting else "ttt_scoring"]

    out, lines = {}, []
    stubs = dict(all_reduce=ledger, score_windows=score_windows, lora_step=lora_step, DocumentLoRA=VirtualLoRA,
                 maybe_compile=lambda model, device: model, synchronize=lambda device: None, time=clock,
                 compiled_blocks=lambda model, device: contextlib.nullcontext(model), ScoreBoard=VirtualBoard)
    with patched(tg, **stubs):
        for name in passes(args):
            clock.now += before.get(name, 0.0)
            t0, mark, now["pass"] = clock.now, ledger.mark(), name
            if name == "ttt":
                tg.evaluate_ttt(virtual_model(args), tokens, None, args, rt, lines.append, deadline)
            else:
                tg.evaluate(None, tokens, None, pass_stride(args, name), args, rt)
            clock.now += overhead
            calls, nbytes, comm = ledger.since(mark)
            out[name] = dict(seconds=clock.now - t0, batches=counts[name + "_batches"], comm_seconds=comm,
                             comm_calls=calls, comm_bytes=nbytes)
    if args.ttt_enabled:
        out["ttt"].update(steps=counts["ttt_steps"], adapted=counts["ttt_adapted"],
                          cut=counts["ttt_adapted"] < counts["ttt_steps"], log=lines)
    out["total_seconds"] = clock.now
    return out


# ----------------------------------------------------------------------------------------------
# measurements on this device
# ----------------------------------------------------------------------------------------------


class RandomLoader:
    """Stands in for TokenLoader with --random-tokens: (inputs, targets) of random ids on the device."""

    def __init__(self, args: tg.Hyperparameters, seqs_per_rank: int, device: torch.device):
        self.seq_len, self.seqs_per_rank = args.train_seq_len, seqs_per_rank
        self.vocab, self.device = args.vocab_size, device

    def next_batch(self):
        r = torch.randint(0, self.vocab, (self.seqs_per_rank, self.seq_len + 1), device=self.device)
        return r[:, :-1], r[:, 1:]


def make_loader(args: tg.Hyperparameters, rt: tg.Runtime, accum: int, random_tokens: bool):
    """This rank's training batches, as main() builds them (TokenLoader: rank r reads its slice)."""
    seqs = args.train_batch_tokens // (rt.world_size * accum * args.train_seq_len)
    if random_tokens:
        return RandomLoader(args, seqs, rt.device)
    return tg.TokenLoader(os.path.join(args.data_path, "fineweb_train_*.bin"), args.train_seq_len, seqs, rt, args.seed,
                          args.vocab_size)


def time_train_phases(args: tg.Hyperparameters, rt: tg.Runtime, loader, accum: int, steps: int,
                      ledger: Ledger | None) -> tuple[dict, tg.GPT, tg.EMA]:
    """Time train_gpt.train itself for `steps` steps of each graph: the 11-pass graph (LOOP_FROM=1: the extra
    passes never start) and the depth-recurrence graph (LOOP_FROM=0). Each call compiles and warms up as
    train() does (WARMUP_STEPS, not timed) and reports loop seconds / steps: data loading, LR schedule,
    optimizers, EMA and the per-step stop/loop all-reduce included. Returns per graph its ms/step, the
    all-reduces of its timed loop (from `ledger`, if any) and the compile/warm-up seconds; and the last
    model and its EMA (for GPTQ)."""
    phases = {"plain": False} | ({"loop": True} if args.num_loops > 0 else {})
    out, model, ema = {}, None, None
    for name, looping in phases.items():
        phase_args = dataclasses.replace(args, iterations=steps, loop_from=0.0 if looping else 1.0)
        del model, ema
        torch.manual_seed(args.seed)
        model = tg.GPT(**tg.model_config(args, BOS_ID)).to(rt.device)
        marks = {}

        def log(msg: str) -> None:
            if msg.startswith("train_start"):  # train() starts its clock right after this line
                marks.update(ledger=ledger.mark() if ledger else 0, t=time.perf_counter())

        t0 = time.perf_counter()
        ran, loop_seconds, ema = tg.train(phase_args, model, loader, rt, accum, log, budget_seconds=1e9)
        calls, nbytes, comm = ledger.since(marks["ledger"]) if ledger else (0, 0, 0.0)
        out[name] = dict(passes=len(model.orders[looping]), step_ms=1000 * loop_seconds / ran, steps=ran,
                         warmup_seconds=marks["t"] - t0, allreduce_calls_per_step=calls / ran,
                         allreduce_bytes_per_step=nbytes / ran, allreduce_ms_per_step=1000 * comm / ran)
    return out, model, ema


def measure_gptq(args: tg.Hyperparameters, model: tg.GPT, ema, loader, rt: tg.Runtime, ledger: Ledger,
                 code: bytes) -> tuple[dict, dict, dict]:
    """What run() does between training and the artifact, on rank 0: EMA weights, Hessians on
    GPTQ_CALIB_BATCHES of this rank's batches (their all-reduces modelled), GPTQ and the step-size search.
    Without a model (--eval-only): the freshly initialised model's round-to-nearest codes, untimed.
    Returns (timing, config, entries)."""
    config, max_bytes = tg.model_config(args, BOS_ID), tg.ARTIFACT_LIMIT_BYTES - 1 - len(code)
    if model is None:
        torch.manual_seed(args.seed)
        state = tg.GPT(**config).to(rt.device).state_dict()
        entries, alpha = tg.quantize_to_fit(tg.matrix_groups(state, {}), tg.quantize_small_tensors(state), config,
                                            max_bytes)
        return {}, config, entries
    t0, mark = time.perf_counter(), ledger.mark()
    ema.copy_to_model()
    hessians = tg.collect_hessians(model, loader, args.gptq_calib_batches, rt) if args.gptq_calib_batches else {}
    groups, small = tg.matrix_groups(model.state_dict(), hessians), tg.quantize_small_tensors(model.state_dict())
    entries, alpha = tg.quantize_to_fit(groups, small, config, max_bytes)
    tg.synchronize(rt.device)
    seconds = time.perf_counter() - t0
    calls, nbytes, comm = ledger.since(mark)
    return dict(seconds=seconds, allreduce_seconds=comm, allreduce_calls=calls, step_scale=alpha), config, entries


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, value) of fn(), the device synchronized before and after."""
    tg.synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    tg.synchronize(device)
    return time.perf_counter() - t0, value


def rank_windows(args: tg.Hyperparameters, n: int, stride: int, rt: tg.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank rt.rank's windows of a pass, as evaluate() selects them."""
    starts, score_from = tg.sliding_windows(n, args.train_seq_len, stride)
    mine = tg.rank_slice(len(starts), rt)
    return starts[mine], score_from[mine]


def time_score_batches(model_fn, tokens: torch.Tensor, windows, args: tg.Hyperparameters, rt: tg.Runtime, first: int,
                       count: int, board: tg.ScoreBoard) -> tuple[float, int]:
    """(seconds per batch, batches timed): score_windows on this rank's score batches first..first+count-1."""
    b = args.eval_batch_seqs
    starts, score_from = windows[0][first * b : (first + count) * b], windows[1][first * b : (first + count) * b]
    batches = -(-len(starts) // b)
    seconds, _ = timed(lambda: tg.score_windows(model_fn, tokens, starts, score_from, b, args.train_seq_len, board,
                                                rt.device), rt.device)
    return seconds / max(batches, 1), batches


class StopPass(Exception):
    """Raised by StepStamps to end evaluate_ttt once its sample is timed (evaluate_ttt's `finally` removes the
    adapters)."""


class StepStamps:
    """Wraps train_gpt.lora_step inside a real evaluate_ttt, stamping perf_counter (the device synchronized) at
    the start of the compile warm-up step (the one not on `stream`), of the first step on the stream, of the first
    scoring-only step (if the deadline stopped adaptation) and after the stream's step `steps - 1`; it counts the
    steps run adapting. With `sample` (a range of step indices) it also times those steps adapting (stamps
    "sample", "sample_end"), then the same steps again scoring only (adapting=False; stamp "scoring_end": the
    board and adapters are discarded) and ends the pass (StopPass) instead of running step sample.stop."""

    def __init__(self, stream: torch.Tensor, steps: int, device: torch.device, sample: range | None = None):
        self.stream, self.steps, self.device, self.sample = stream, steps, device, sample
        self.real_step, self.stamps, self.done, self.adapted, self.rows = tg.lora_step, {}, 0, 0, []

    def stamp(self, name: str) -> None:
        tg.synchronize(self.device)
        self.stamps[name] = time.perf_counter()

    def __call__(self, model_fn, lora, tokens, plan, width, board, adapting, lr) -> None:
        if tokens is not self.stream:
            self.stamp("warmup")
            return self.real_step(model_fn, lora, tokens, plan, width, board, adapting, lr)
        i = self.done
        if i == 0:
            self.stamp("steps")
        if not adapting and "scoring" not in self.stamps:
            self.stamp("scoring")
        if self.sample is not None:
            if i == self.sample.start:
                self.stamp("sample")
            if i == self.sample.stop:
                self.stamp("sample_end")
                for rows in self.rows:
                    self.real_step(model_fn, lora, tokens, rows, width, board, False, lr)
                self.stamp("scoring_end")
                raise StopPass
            if i in self.sample:
                self.rows.append(plan)
        self.real_step(model_fn, lora, tokens, plan, width, board, adapting, lr)
        self.done, self.adapted = i + 1, self.adapted + adapting
        if self.done == self.steps:
            self.stamp("last")


def run_ttt(model: tg.GPT, tokens: torch.Tensor, args: tg.Hyperparameters, rt: tg.Runtime, deadline: float,
            stamps: StepStamps) -> list[str]:
    """train_gpt.evaluate_ttt itself as rank rt.rank on the whole stream (its finalize without the exactly-once
    check: only this rank's share is scored), lora_step wrapped by `stamps`; stamps "call" and "end" around it.
    Returns its log lines."""
    lines = []
    with patched(tg, lora_step=stamps), patched(tg.ScoreBoard, finalize=partial_finalize):
        stamps.stamp("call")
        try:
            tg.evaluate_ttt(model, tokens, None, args, rt, lines.append, deadline)
        except StopPass:
            pass
        stamps.stamp("end")
    return lines


def measure_ttt(model: tg.GPT, tokens: torch.Tensor, args: tg.Hyperparameters, rt: tg.Runtime, steps: int, warm: int,
                sample: int) -> dict:
    """TTT's fixed and unit times on rank rt.rank, from train_gpt.evaluate_ttt itself on the whole stream (`steps`
    steps: rank_lora_plan's), stopped after its first warm+sample steps (StepStamps): its set-up seconds (documents,
    schedule, adapters: from the call to the warm-up step), compile + warm-up seconds (the warm-up step and what
    follows it until the first step), and the seconds per step of steps warm..warm+sample-1, adapting and scoring
    only (the same steps again, adapting=False)."""
    first = min(warm, max(steps - 2, 0))
    sampled = range(first, min(first + sample, steps - 1))
    if not sampled:
        raise SystemExit(f"rank {rt.rank} runs {steps} TTT steps: too few to time one (use a longer --tokens)")
    stamps = StepStamps(tokens, steps, rt.device, sampled)
    run_ttt(model, tokens, args, rt, math.inf, stamps)
    t = stamps.stamps
    return dict(setup_seconds=t["warmup"] - t["call"], warmup_seconds=t["steps"] - t["warmup"],
                adapting_step_s=(t["sample_end"] - t["sample"]) / len(sampled),
                scoring_step_s=(t["scoring_end"] - t["sample_end"]) / len(sampled), steps_sampled=len(sampled),
                steps_untimed=first)


def full_ttt(args: tg.Hyperparameters, rt: tg.Runtime, model: tg.GPT, tokens: torch.Tensor, steps: int,
             skipped_compile: float, ledger: Ledger, seconds_left: float) -> dict:
    """--full: evaluate_ttt on rank rt.rank's whole share (`steps` steps), timed by StepStamps: its set-up, its steps
    adapting and scoring only, and the rest (finalize); also its own warm-up (not in the total). Its deadline is
    `seconds_left` from now (the projected evaluation time before TTT and TTT's modelled all-reduces taken off)
    less `skipped_compile` seconds: its graph is compiled already (measure_ttt), so its warm-up is about one step
    instead of the cold compile + warm-up of the run."""
    mark, stamps = ledger.mark(), StepStamps(tokens, steps, rt.device)
    log = run_ttt(model, tokens, args, rt, time.perf_counter() + seconds_left - skipped_compile, stamps)
    t = stamps.stamps
    cut = t.get("scoring", t["last"])
    return dict(ttt_setup=t["warmup"] - t["call"], ttt_adapting=cut - t["steps"], ttt_scoring=t["last"] - cut,
                ttt_rest=t["end"] - t["last"], ttt_comm=ledger.since(mark)[2], ttt_adapted=stamps.adapted,
                ttt_own_warmup=t["steps"] - t["warmup"], ttt_log=log)


def stand_in_stream(args: tg.Hyperparameters, n: int, random_tokens: bool) -> tuple[torch.Tensor, str]:
    """n+1 tokens standing in for the contest's validation stream: DATA_PATH's validation tokens tiled (their
    document boundaries set TTT's work and matter with DOC_MASK=1), or random ids (BOS among them at random).
    Returns (int64 tokens on CPU, a description)."""
    if random_tokens:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, args.vocab_size, (n + 1,), generator=g), "random tokens"
    pattern = os.path.join(args.data_path, "fineweb_val_*.bin")
    val = tg.load_validation_tokens(pattern, args.train_seq_len, args.vocab_size)
    return val.repeat(-(-(n + 1) // val.numel()))[: n + 1], f"{pattern} ({val.numel():,} tokens) tiled"


def measure_eval(args: tg.Hyperparameters, rt: tg.Runtime, a, float_model, config: dict, entries: dict,
                 artifact_path: str, tokens: torch.Tensor, ttt_steps: int, ledger: Ledger) -> dict:
    """Rank 0's evaluation in run()'s order, timing each fixed phase once and each pass by a sample of its
    batches (after `warm` untimed ones): pack + write of the artifact; the pre-quant pass's compilation
    (first batch of the compiled float model, less one batch) and batches; loading the artifact;
    compilation and warm-up of the scoring graph (maybe_compile + warm_up_eval_graphs); round-trip batches;
    window set-up and finalize of one pass; the final pass: TTT (measure_ttt on the stream, whose evaluated rank runs
    `ttt_steps` steps) or, with TTT_ENABLED=0, sliding batches. With a.full also the whole of each plain pass
    (train_gpt's evaluate; project() runs TTT's)."""
    device, n, seq_len, warm = rt.device, tokens.numel() - 1, args.train_seq_len, 3
    out: dict = {"full": {}}
    pack_s, blob = timed(lambda: tg.pack_artifact(config, entries), device)
    write_s, _ = timed(lambda: tg.atomic_write(artifact_path, blob), device)
    out.update(compress_seconds=pack_s + write_s, artifact_bytes=len(blob))
    dummy_bytes = torch.ones(n, dtype=torch.int64)
    windows = {name: rank_windows(args, n, pass_stride(args, name), rt) for name in plain_passes(args)}
    board = tg.ScoreBoard(n, device)

    def sample(name: str, model_fn) -> None:
        batches = -(-len(windows[name][0]) // args.eval_batch_seqs)
        skip = min(warm, max(batches - 1, 0))  # a short pass (tiny streams): keep at least one batch to time
        time_score_batches(model_fn, tokens, windows[name], args, rt, 0, skip, board)
        out[name + "_batch_s"], out[name + "_batches_sampled"] = time_score_batches(
            model_fn, tokens, windows[name], args, rt, skip, a.sample_batches, board)

    def full(name: str, model_fn) -> None:
        if a.full:
            mark, stride = ledger.mark(), pass_stride(args, name)
            with patched(tg.ScoreBoard, finalize=partial_finalize):
                out["full"][name], _ = timed(lambda: tg.evaluate(model_fn, tokens, dummy_bytes, stride, args, rt),
                                             device)
            out["full"][name + "_comm"] = ledger.since(mark)[2]

    if float_model is not None:  # the pre-quant diagnostic: the float model, compiled on its own
        fn = tg.maybe_compile(float_model, device)
        cold, _ = timed(lambda: tg.score_windows(fn, tokens, windows["prequant"][0][: args.eval_batch_seqs],
                                              windows["prequant"][1][: args.eval_batch_seqs], args.eval_batch_seqs,
                                              seq_len, board, device), device)
        sample("prequant", fn)
        out["prequant_compile_seconds"] = max(cold - out["prequant_batch_s"], 0.0)
        full("prequant", fn)
        del fn
    out["load_seconds"], (model, _) = timed(lambda: tg.load_artifact_model(artifact_path, device), device)
    compile_s, model_fn = timed(lambda: tg.maybe_compile(model, device), device)
    warm_s, _ = timed(lambda: tg.warm_up_eval_graphs(model, model_fn, args, rt), device)
    out["warmup_seconds"] = compile_s + warm_s  # the scoring graph is the pre-quant pass's: reused, as in run()
    if float_model is None:  # --eval-only: the pre-quant pass is timed with the loaded model's graph; the warm-up
        sample("prequant", model_fn)  # compiled the scoring graph, which run() compiles once, for the pre-quant pass
        out["prequant_compile_seconds"] = 0.0
        full("prequant", model_fn)
    sample("roundtrip", model_fn)
    full("roundtrip", model_fn)

    def finalize_pass():
        tg.sliding_windows(n, seq_len, args.eval_stride)  # what evaluate() computes first
        b = tg.ScoreBoard(n, device)
        b.count.fill_(1)
        b.finalize(dummy_bytes, rt)

    out["pass_overhead_seconds"], _ = timed(finalize_pass, device)
    if args.ttt_enabled:
        out["ttt"] = measure_ttt(model, tokens, args, rt, ttt_steps, 2, a.sample_steps)
    else:
        sample("sliding", model_fn)
        full("sliding", model_fn)
    out["_model"] = model
    return out


# ----------------------------------------------------------------------------------------------
# projection and report
# ----------------------------------------------------------------------------------------------


def project_training(args: tg.Hyperparameters, train: dict, ddp_seconds: float, gptq: dict) -> dict:
    """Steps in MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS: LOOP_FROM of that budget at the 11-pass step time,
    the rest at the depth-recurrence step time, each = measured step + modelled all-reduces (DDP gradients,
    Muon updates, stop flags; no overlap). train() stops at the first step ending past the budget."""
    budget = args.max_wallclock_seconds - args.gptq_reserve_seconds
    plain = train["plain"]
    loop = train.get("loop", plain)
    frac = args.loop_from if "loop" in train else 1.0
    out = {"budget_seconds": budget}
    for label, comm in (("", True), ("_overlapped", False)):
        t_plain = (plain["step_ms"] + (plain["allreduce_ms_per_step"] + 1000 * ddp_seconds if comm else 0)) / 1000
        t_loop = (loop["step_ms"] + (loop["allreduce_ms_per_step"] + 1000 * ddp_seconds if comm else 0)) / 1000
        plain_steps = min(math.ceil(frac * budget / t_plain), args.iterations)
        loop_steps = min(max(math.ceil((budget - plain_steps * t_plain) / t_loop), 0), args.iterations - plain_steps)
        out[f"plain_step_ms{label}"], out[f"loop_step_ms{label}"] = 1000 * t_plain, 1000 * t_loop
        out[f"plain_steps{label}"], out[f"loop_steps{label}"] = plain_steps, loop_steps
        out[f"steps{label}"] = plain_steps + loop_steps
        out[f"loop_seconds{label}"] = plain_steps * t_plain + loop_steps * t_loop
    gptq_seconds = gptq.get("seconds", 0.0) + gptq.get("allreduce_seconds", 0.0)
    out.update(gptq_seconds=gptq_seconds, train_seconds=out["loop_seconds"] + gptq_seconds)
    out["margin_seconds"] = args.max_wallclock_seconds - out["train_seconds"]
    return out


def eval_units(args: tg.Hyperparameters, m: dict) -> tuple[dict, dict, float]:
    """(seconds per unit for virtual_eval, seconds ahead of each pass, overhead per pass) from measure_eval."""
    unit = {name: m[name + "_batch_s"] for name in plain_passes(args)}
    before = {"prequant": m["compress_seconds"] + m["prequant_compile_seconds"],
              "roundtrip": m["load_seconds"] + m["warmup_seconds"]}
    if args.ttt_enabled:
        t = m["ttt"]
        unit.update(ttt_warmup=t["warmup_seconds"], ttt_adapting=t["adapting_step_s"], ttt_scoring=t["scoring_step_s"])
        before["ttt"] = t["setup_seconds"]
    return unit, before, m["pass_overhead_seconds"]


def print_training(args: tg.Hyperparameters, info: dict, train: dict, p: dict, comm: dict, world: int) -> None:
    """Training table: measured ms/step of each graph, modelled all-reduce ms, steps in the budget, margin."""
    seqs = args.train_batch_tokens // (world * info["accum"] * args.train_seq_len)
    print(f"\nTRAINING (per rank and step: {info['accum']} x {seqs} x {args.train_seq_len} = "
          f"{info['accum'] * seqs * args.train_seq_len:,} tokens)")
    print(f"{'graph':<8}{'passes':>7}{'ms/step':>10}{'+comm ms':>10}{'= ms':>9}{'seconds':>10}{'steps':>8}")
    for name in train:
        t, total, steps = train[name], p[f"{name}_step_ms"], p[f"{name}_steps"]
        print(f"{name:<8}{t['passes']:>7}{t['step_ms']:>10.2f}{total - t['step_ms']:>10.2f}{total:>9.2f}"
              f"{steps * total / 1000:>10.1f}{steps:>8,}")
    t = train["plain"]
    print(f"all-reduces per step: DDP fp32 gradients {comm['ddp_bytes'] / 1e6:.1f} MB in {comm['ddp_buckets']} buckets "
          f"{1000 * comm['ddp_seconds']:.2f} ms; Muon bf16 updates + stop flags "
          f"{t['allreduce_bytes_per_step'] / 1e6:.1f} MB in {t['allreduce_calls_per_step']:.2f} calls "
          f"{t['allreduce_ms_per_step']:.2f} ms")
    capped = " (ITERATIONS caps it)" if p["steps"] >= args.iterations else ""
    print(f"steps {p['steps']:,}{capped} ({p['steps_overlapped']:,} if all communication overlapped); loop "
          f"{p['loop_seconds']:.1f} s + GPTQ {p['gptq_seconds']:.1f} s measured (reserve "
          f"{args.gptq_reserve_seconds:g} s) = {p['train_seconds']:.1f} s; margin {p['margin_seconds']:.1f} s under "
          f"{args.max_wallclock_seconds:g} s")
    warm = sum(t["warmup_seconds"] for t in train.values())
    print(f"compile + warm-up before the clock (not counted): {warm:.1f} s over {len(train)} train() calls")


def eval_rows(args: tg.Hyperparameters, m: dict, proj: dict) -> list[tuple]:
    """(label, count, seconds per unit or None, seconds, full-run seconds or None) of each evaluation phase."""
    full, names = m["full"], passes(args)

    def fixed(label: str, value: float, full_value: float | None = None) -> tuple:  # measured once
        return label, 1, None, value, value if full_value is None else full_value

    def batches(label: str, name: str) -> tuple:  # a plain pass
        count = proj[name]["batches"]
        return (f"{label} pass (stride {pass_stride(args, name)})", count, m[name + "_batch_s"],
                count * m[name + "_batch_s"], full.get(name))

    rows = [fixed("artifact pack + write", m["compress_seconds"]),
            fixed("pre-quant compile", m["prequant_compile_seconds"]),
            batches("pre-quant", "prequant"),
            fixed("artifact load", m["load_seconds"]),
            fixed("compile + warm-up", m["warmup_seconds"]),
            batches("round-trip", "roundtrip")]
    if args.ttt_enabled:
        ttt, t, shape = proj["ttt"], m["ttt"], f"{args.ttt_lora_rows} x {args.train_seq_len}"
        rows += [fixed("TTT set-up (documents, plan, adapters)", t["setup_seconds"], full.get("ttt_setup")),
                 fixed("TTT compile + warm-up", t["warmup_seconds"]),  # a --full run's graph is compiled already
                 (f"TTT steps ({shape}, adapting)", ttt["adapted"], t["adapting_step_s"],
                  ttt["adapted"] * t["adapting_step_s"], full.get("ttt_adapting")),
                 (f"TTT steps ({shape}, scoring only)", ttt["steps"] - ttt["adapted"], t["scoring_step_s"],
                  (ttt["steps"] - ttt["adapted"]) * t["scoring_step_s"], full.get("ttt_scoring"))]
    else:
        rows.append(batches("sliding", "sliding"))
    rows.append(("pass set-up + finalize", len(names), m["pass_overhead_seconds"],
                 len(names) * m["pass_overhead_seconds"], full.get("ttt_rest")))  # a plain pass's: in its full time
    full_comm = sum(v for k, v in full.items() if k.endswith("_comm")) if full else None
    rows.append(("all-reduce (modelled)", sum(proj[p]["comm_calls"] for p in names), None,
                 sum(proj[p]["comm_seconds"] for p in names), full_comm))
    return rows


def print_eval(a, args: tg.Hyperparameters, counts: dict, m: dict, proj: dict, need: dict) -> None:
    """Evaluation table (count x unit = seconds per phase; full-run seconds with --full), total, margins, TTT
    deadline verdict, and the counts and samples behind it."""
    limit, w = args.eval_max_seconds, a.world_size
    print(f"\nEVALUATION (rank {counts['rank']} of {w}, the busiest; EVAL_MAX_SECONDS {limit:g})")
    print(f"{'phase':<40}{'count':>8}{'unit ms':>10}{'seconds':>10}" + (f"{'full run':>10}" if a.full else ""))
    for label, count, unit_s, seconds, full_s in eval_rows(args, m, proj):
        unit_txt = f"{1000 * unit_s:>10.2f}" if unit_s is not None else " " * 10
        full_txt = (f"{full_s:>10.1f}" if full_s is not None else " " * 10) if a.full else ""
        print(f"{label:<40}{count:>8,}{unit_txt}{seconds:>10.1f}{full_txt}")
    full_total = f"{m['full'].get('total', math.nan):>10.1f}" if a.full else ""
    print(f"{'total':<40}{'':>18}{proj['total_seconds']:>10.1f}{full_total}")
    print(f"margin: {limit - proj['total_seconds']:.1f} s under {limit:g} s; "
          f"{0.9 * limit - need['total_seconds']:.1f} s under {0.9 * limit:g} s (10 % margin"
          + (f"; without the TTT deadline the run needs {need['total_seconds']:.1f} s)" if args.ttt_enabled else ")"))
    if args.ttt_enabled:
        print_ttt_verdict(proj["ttt"], m["full"])
    print(counts_line(args, counts, w))
    print(sampled_line(args, m))


def print_ttt_verdict(ttt: dict, full: dict) -> None:
    """Whether TTT's deadline rule stops adaptation in the projection, after how many steps (and how many steps a
    --full run adapted)."""
    if ttt["cut"]:
        print(f"TTT DEADLINE: adaptation stops after {ttt['adapted']:,} of {ttt['steps']:,} steps (train_gpt's own "
              f"rule); the remaining {ttt['steps'] - ttt['adapted']:,} only score, so the score gets worse")
    else:
        print(f"TTT deadline not reached: all {ttt['steps']:,} steps adapt")
    if "ttt_adapted" in full:
        print(f"full run: TTT adapted {full['ttt_adapted']:,} of {ttt['steps']:,} steps")


def counts_line(args: tg.Hyperparameters, c: dict, world: int) -> str:
    """The counts behind the table: the evaluated rank's windows and score batches of the round-trip (and pre-quant)
    pass, then of the final pass: TTT's documents, steps and row-tokens, or the sliding pass's windows and batches."""
    line = (f"counts (rank {c['rank']} of {world}, n={c['n_targets']:,}): round-trip {c['roundtrip_windows']:,} "
            f"windows = {c['roundtrip_batches']:,} batches of {args.eval_batch_seqs}; ")
    if args.ttt_enabled:
        return line + (f"TTT {c['ttt_documents']:,} of {c['ttt_all_documents']:,} documents ({c['ttt_targets']:,} "
                       f"targets) in {c['ttt_steps']:,} steps of {args.ttt_lora_rows} x {args.train_seq_len} "
                       f"({c['ttt_windows']:,} windows of chunks of {args.ttt_lora_chunk}, at most "
                       f"{c['ttt_max_windows']} of {args.ttt_lora_docs} slots a step; some window trains in "
                       f"{c['ttt_training_steps']:,}); "
                       f"row-tokens {c['ttt_row_tokens_read']:,} read of {c['ttt_row_tokens']:,} computed "
                       f"({100 * c['ttt_row_tokens_read'] / max(c['ttt_row_tokens'], 1):.0f} %)")
    return line + f"sliding {c['sliding_windows']:,} windows = {c['sliding_batches']:,} batches"


def sampled_line(args: tg.Hyperparameters, m: dict) -> str:
    """How many score batches (and TTT steps) each unit time was measured on."""
    line = f"sampled: {m['prequant_batches_sampled']} pre-quant, {m['roundtrip_batches_sampled']} round-trip"
    if args.ttt_enabled:
        t = m["ttt"]
        return line + (f" batches; TTT steps {t['steps_untimed']}..{t['steps_untimed'] + t['steps_sampled'] - 1} "
                       "of the rank's plan, adapting, then the same steps scoring only")
    return line + f", {m['sliding_batches_sampled']} sliding batches"


def print_report(a, info: dict, counts: dict, train: dict | None, tproj: dict | None, comm: dict, m: dict,
                 proj: dict, need: dict, args: tg.Hyperparameters) -> None:
    """The projection as compact tables (see the module docstring for what is measured and modelled)."""
    w = a.world_size
    print(f"\n== projected {w}-GPU run, measured on {info['device']} ==")
    print(f"date {info['date']}  torch {info['torch']}  train_gpt.py sha256 {info['code_sha256'][:16]}…  "
          f"env overrides: {info['overrides'] or '(none)'}")
    print(f"all-reduce model: ring over {w} ranks, {info['ring']}; busbw {info['busbw_gbs']:.0f} GB/s, "
          f"{info['hop_latency_us']:.1f} us per hop; added to compute, no overlap")
    print(f"eval stream: {counts['n_targets']:,} targets, {info['stream']}; evaluation plays {info['busiest']}")
    if train:
        print_training(args, info, train, tproj, comm, w)
    print_eval(a, args, counts, m, proj, need)
    check = info.get("check")
    if check:
        real = ", ".join(f"{k} {v['step_ms']:.2f} ms" for k, v in check["phases"].items())
        if train and check["world_size"] == w:
            emulated = (f"{k} {tproj[f'{k}_step_ms']:.2f} ms" for k in check["phases"] if k in train)
            real += " against " + ", ".join(emulated) + " emulated here"
        else:
            real += f"; compare with --world-size {check['world_size']} on one of those GPUs"
        print(f"method check ({a.comm_json}): real {check['world_size']}-rank steps (DDP, NCCL) on {check['device']}: "
              + real)
    print("not modelled: 8 processes compiling and compressing on one host at once, ranks waiting for the slowest, "
          "DDP's bucket copies, overlap of communication with compute (none assumed)"
          + ("; the artifact packed is a briefly trained model's (a trained one's codes differ: use "
             "--artifact)" if not a.artifact else ""))


# ----------------------------------------------------------------------------------------------
# --comm: NCCL all-reduce of the run's message sizes on several real GPUs
# ----------------------------------------------------------------------------------------------


def message_sizes(args: tg.Hyperparameters, n: int) -> list[tuple[str, int, torch.dtype]]:
    """(name, elements, dtype) of every all-reduce the run makes: DDP's gradient buckets, Muon's flat bf16
    updates, GPTQ Hessians, the score boards (fp32 NLL, int32 counts) and the small stop flags (TTT's adapters are
    per rank: it all-reduces only its score board)."""
    model = tg.GPT(**tg.model_config(args, BOS_ID))
    sizes = [(f"ddp_bucket_{b}", b // 4, torch.float32) for b in sorted(set(ddp_bucket_bytes(model)))]
    sizes.append(("muon_updates", sum(p.numel() for p in tg.linear_weights(model)), torch.bfloat16))
    cols = sorted({m.in_features for m in model.blocks.modules() if isinstance(m, nn.Linear)})
    sizes += [(f"gptq_hessian_{c}", c * c, torch.float32) for c in cols]
    sizes += [("score_nll", n, torch.float32), ("score_count", n, torch.int32), ("stop_flags", 2, torch.float32)]
    return sizes


def time_all_reduce(numel: int, dtype: torch.dtype, rt: tg.Runtime, iters: int, warmup: int = 5) -> float:
    """Median seconds of one all-reduce of `numel` elements (CUDA events on GPU; ranks aligned by a barrier
    before each call), after `warmup` untimed ones; the max of the ranks' medians."""
    t = torch.zeros(numel, dtype=dtype, device=rt.device)
    for _ in range(warmup):
        dist.all_reduce(t)
    times = []
    for _ in range(iters):
        dist.barrier()
        tg.synchronize(rt.device)
        if rt.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(t)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:  # gloo on CPU: only to try this mode without GPUs
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
    median = torch.tensor([statistics.median(times)], device=rt.device, dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median)


def comm_main(a) -> None:
    """--comm (under torchrun on >= 2 GPUs): time NCCL all-reduces of exactly the run's message sizes, derive
    the hop latency (smallest message) and the bus bandwidth of each size, optionally time real training
    steps of this world size (DDP, NCCL) as a check of the one-GPU emulation; write JSON (rank 0)."""
    args, _ = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    if not rt.distributed:
        raise SystemExit("--comm runs under torchrun on 2 or more GPUs: "
                         "torchrun --standalone --nproc_per_node=2 bench/project_8gpu.py --comm --out comm.json")
    w = rt.world_size
    messages = []
    for name, numel, dtype in message_sizes(args, a.tokens):
        seconds = time_all_reduce(numel, dtype, rt, a.iters)
        messages.append(dict(name=name, bytes=numel * torch.empty((), dtype=dtype).element_size(),
                             dtype=str(dtype).removeprefix("torch."), median_s=seconds))
    hop = min(msg["median_s"] for msg in messages) / (2 * (w - 1))
    for msg in messages:  # bandwidth of each message >= 64 KiB, its latency part taken off
        if msg["bytes"] >= 64 * 1024:
            msg["wire_s"] = max(msg["median_s"] - 2 * (w - 1) * hop, 1e-9)
            msg["busbw_gbs"] = 2 * (w - 1) / w * msg["bytes"] / msg["wire_s"] / 1e9
    measured = [msg for msg in messages if "busbw_gbs" in msg]
    large = [msg for msg in measured if msg["bytes"] >= 1 << 20] or measured
    busbw = (sum(2 * (w - 1) / w * msg["bytes"] for msg in large) / sum(msg["wire_s"] for msg in large) / 1e9
             if large else DEFAULT_BUSBW_GBS)
    cuda = rt.device.type == "cuda"
    result = dict(world_size=w, device=torch.cuda.get_device_name(rt.device) if cuda else "cpu",
                  torch=torch.__version__,
                  nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else "none (gloo)",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  code_sha256=hashlib.sha256(open(os.path.join(REPO, "train_gpt.py"), "rb").read()).hexdigest(),
                  hop_latency_s=hop, busbw_gbs=busbw, messages=messages)
    if a.check_steps:
        accum = tg.grad_accum_steps(args, rt)
        loader = make_loader(args, rt, accum, a.random_tokens)
        phases, _, _ = time_train_phases(args, rt, loader, accum, a.check_steps, None)
        result["check"] = dict(world_size=w, device=result["device"], accum=accum, phases=phases,
                               train_batch_tokens=args.train_batch_tokens)
    if rt.is_main:
        for msg in messages:
            print(f"{msg['name']:<22}{msg['bytes']:>14,} B {msg['dtype']:<9}{1e6 * msg['median_s']:>10.1f} us"
                  + (f"{msg['busbw_gbs']:>9.1f} GB/s" if "busbw_gbs" in msg else ""))
        print(f"hop latency {1e6 * hop:.2f} us; bus bandwidth (messages >= 1 MiB) {result['busbw_gbs']:.1f} GB/s")
        for name, p in result.get("check", {}).get("phases", {}).items():
            print(f"real {w}-rank training step, {name}: {p['step_ms']:.2f} ms (accum {accum})")
        tg.atomic_write(a.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {a.out}")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def busiest_rank(args: tg.Hyperparameters, tokens: torch.Tensor, world: int) -> tuple[int, list[dict]]:
    """The rank whose evaluation takes longest, judged by its final pass's work (TTT steps, or sliding score
    batches without TTT), then its round-trip batches; lowest index on ties. Ranks wait for each other only at
    the final all-reduce, so the run's evaluation lasts as long as this rank's. Returns (rank, every rank's
    work_counts)."""
    every = [work_counts(args, tokens, world, r) for r in range(world)]
    final = "ttt_steps" if args.ttt_enabled else "sliding_batches"
    return max(range(world), key=lambda r: (every[r][final], every[r]["roundtrip_batches"], -r)), every


def describe(a, args: tg.Hyperparameters, overrides: dict, device: torch.device, ring: RingModel, accum: int,
             code: bytes, rank: int, every: list[dict]) -> dict:
    """What the report's header states: device, versions, date, code, settings, communication model, and which
    rank the evaluation plays (the busiest, `rank`) against the others' work (`every`: work_counts per rank)."""
    final = "ttt_steps" if args.ttt_enabled else "sliding_batches"
    work = [c[final] for c in every]
    busiest = (f"rank {rank} ({final.replace('_', ' ')} {work[rank]:,}; ranks range {min(work):,}-{max(work):,}, "
               f"rank 0 {work[0]:,})")
    check = json.load(open(a.comm_json)).get("check") if a.comm_json else None
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                code_sha256=hashlib.sha256(code).hexdigest(), accum=accum, busiest=busiest, check=check,
                overrides=" ".join(f"{k}={v}" for k, v in sorted(overrides.items())),
                ring=ring.source, busbw_gbs=ring.busbw / 1e9, hop_latency_us=ring.hop_latency * 1e6)


def per_step_messages(args: tg.Hyperparameters, ring: RingModel) -> dict:
    """Bytes and modelled seconds of DDP's gradient all-reduce per training step."""
    torch.manual_seed(args.seed)
    buckets = ddp_bucket_bytes(tg.GPT(**tg.model_config(args, BOS_ID)))
    return dict(ddp_bytes=sum(buckets), ddp_buckets=len(buckets), ddp_seconds=sum(ring.seconds(b) for b in buckets))


def single_process_wrap(model: tg.GPT, rt: tg.Runtime) -> nn.Module:
    """Stands in for train_gpt.wrap_for_training on a fake rank: compiled as there, without DDP."""
    return SingleProcessDDP(tg.maybe_compile(model, rt.device))


def project(a) -> dict:
    """Measure one rank's work on this device and print the projected run (see the module docstring)."""
    args, overrides = tg.Hyperparameters.from_env()
    device = tg.init_runtime().device  # no WORLD_SIZE: one process; sets TF32 and the Inductor flags as a run does
    rt = tg.Runtime(rank=0, world_size=a.world_size, local_rank=0, device=device)  # training: every rank alike
    ring, accum = ring_model(a), tg.grad_accum_steps(args, rt)
    code = open(os.path.join(REPO, "train_gpt.py"), "rb").read()
    stream, stream_info = stand_in_stream(args, a.tokens, a.random_tokens)
    rank, every = busiest_rank(args, stream, a.world_size)
    counts, ledger, ert = every[rank], Ledger(ring), dataclasses.replace(rt, rank=rank)  # ert: the evaluation's rank
    info = describe(a, args, overrides, device, ring, accum, code, rank, every) | {"stream": stream_info}
    comm = per_step_messages(args, ring)
    train = tproj = model = None
    with patched(tg, all_reduce=ledger, wrap_for_training=single_process_wrap):
        if not a.eval_only:
            loader = make_loader(args, rt, accum, a.random_tokens)
            print(f"timing train_gpt.train: {a.train_steps} steps per graph as rank 0 of {a.world_size}", flush=True)
            train, model, ema = time_train_phases(args, rt, loader, accum, a.train_steps, ledger)
            gptq, config, entries = measure_gptq(args, model, ema, loader, rt, ledger, code)
            tproj = project_training(args, train, comm["ddp_seconds"], gptq)
            del loader, ema
        else:
            _, config, entries = measure_gptq(args, None, None, None, rt, ledger, code)
        if a.artifact:
            config, entries = tg.unpack_artifact(open(a.artifact, "rb").read(), a.artifact)
            ours = tg.model_config(args, BOS_ID)
            for key in (k for k in ours if config.get(k) != ours[k]):  # evaluation runs the artifact's model
                print(f"WARNING: {a.artifact} has {key}={config.get(key)}, the environment {ours[key]}: the "
                      "evaluation times the artifact's model, the training the environment's")
        tokens = stream.to(device)
        print(f"timing the evaluation as rank {rank} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            m = measure_eval(args, ert, a, model, config, entries, os.path.join(tmp, "artifact.ptz"), tokens,
                             counts.get("ttt_steps", 0), ledger)
        del model
        unit, before, overhead = eval_units(args, m)
        replay = lambda deadline: virtual_eval(args, stream, a.world_size, ring, unit, before, overhead,  # noqa: E731
                                               deadline, rank)
        proj, need = replay(args.eval_max_seconds), replay(math.inf)
        assert [proj[p]["batches"] for p in plain_passes(args)] == [counts[BATCH_KEYS[p]] for p in plain_passes(args)]
        assert not args.ttt_enabled or need["ttt"]["steps"] == need["ttt"]["adapted"] == counts["ttt_steps"]
        model = m.pop("_model")
        if a.full:
            f = m["full"]
            plain = before["prequant"] + before["roundtrip"] + sum(f[p] + f[p + "_comm"] for p in plain_passes(args))
            if args.ttt_enabled:
                left = args.eval_max_seconds - plain - need["ttt"]["comm_seconds"]
                skipped = m["ttt"]["warmup_seconds"] - m["ttt"]["adapting_step_s"]
                f.update(full_ttt(args, ert, model, tokens, counts["ttt_steps"], skipped, ledger, left))
                plain += m["ttt"]["warmup_seconds"] + sum(f[k] for k in ("ttt_setup", "ttt_adapting", "ttt_scoring",
                                                                          "ttt_rest", "ttt_comm"))
            f["total"] = plain
    print_report(a, info, counts, train, tproj, comm, m, proj, need, args)
    result = dict(info=info, counts=counts, training=train, training_projection=tproj, comm=comm, eval_measured=m,
                  eval_projection=proj, eval_needed_without_deadline=need["total_seconds"])
    if a.json:
        tg.atomic_write(a.json, (json.dumps(result, indent=2, default=str) + "\n").encode())
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=8, help="ranks of the projected run (default 8)")
    ap.add_argument("--tokens", type=int, default=CONTEST_TARGETS,
                    help=f"validation targets of the projected run (default {CONTEST_TARGETS:,}, FineWeb's)")
    ap.add_argument("--random-tokens", action="store_true",
                    help="random token ids for the evaluation stream and training batches instead of DATA_PATH's")
    ap.add_argument("--artifact", default="", help="time packing and loading of this artifact (a P300 run's; "
                    "bench/compression.py --write converts an older format); default: the briefly trained model's")
    ap.add_argument("--train-steps", type=int, default=50, help="timed train() steps per graph (after WARMUP_STEPS)")
    ap.add_argument("--sample-batches", type=int, default=40, help="timed score batches per pass (after 3 untimed)")
    ap.add_argument("--sample-steps", type=int, default=20,
                    help="timed TTT steps, adapting and then scoring only (after 2 untimed; with TTT only)")
    ap.add_argument("--full", action="store_true",
                    help="also run the evaluated rank's whole share of every pass (a check)")
    ap.add_argument("--eval-only", action="store_true",
                    help="skip the training measurement (the pre-quant pass is then timed with the loaded model)")
    ap.add_argument("--comm-json", default="", help="all-reduce measurements written by --comm")
    ap.add_argument("--busbw-gbs", type=float, default=DEFAULT_BUSBW_GBS,
                    help=f"ring bus bandwidth without --comm-json (default {DEFAULT_BUSBW_GBS:g} GB/s)")
    ap.add_argument("--hop-latency-us", type=float, default=DEFAULT_HOP_LATENCY_US,
                    help=f"latency per ring hop without --comm-json (default {DEFAULT_HOP_LATENCY_US:g} us)")
    ap.add_argument("--json", default="", help="write every number to this JSON file")
    ap.add_argument("--keep-inductor-cache", action="store_true",
                    help="use the usual compiler cache (default: an empty one, as on a fresh machine)")
    ap.add_argument("--comm", action="store_true", help="under torchrun: measure NCCL all-reduces, write --out")
    ap.add_argument("--out", default="comm.json", help="--comm: output JSON")
    ap.add_argument("--iters", type=int, default=20, help="--comm: timed all-reduces per message size")
    ap.add_argument("--check-steps", type=int, default=20,
                    help="--comm: real training steps per graph on these GPUs, as a check of the emulation (0: none)")
    return ap.parse_args(argv)


def fresh_compiler_cache() -> None:
    """Point Inductor (and Triton, whose cache lives inside it) at an empty folder, removed at exit, so the
    compile times are those of a fresh machine. Inductor reads the variable when it first compiles."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="project_8gpu_inductor_")
        atexit.register(shutil.rmtree, folder, True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


def main(argv=None) -> None:
    a = parse_args(argv)
    if not a.keep_inductor_cache:
        fresh_compiler_cache()
    if a.comm:
        comm_main(a)
    else:
        project(a)


if __name__ == "__main__":
    main()
