"""bench/project_8gpu.py: its work counts are what train_gpt's evaluate / evaluate_ttt really run on a rank of
8, its virtual replay stops TTT where train_gpt's deadline rule does, and its main path runs on CPU."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import CPU, REPO_ROOT, TINY_ENV, script_env, tg, tiny_model_env

SCRIPT = REPO_ROOT / "bench" / "project_8gpu.py"
_spec = importlib.util.spec_from_file_location("project_8gpu", SCRIPT)
bench = sys.modules["project_8gpu"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(bench)


class CountingModel(torch.nn.Module):
    """Stands in for the model (and its compiled function) in train_gpt's evaluation: records every forward as
    ("S", shape) when scoring (inference mode) or ("T", shape) when training; each forward can advance a clock."""

    def __init__(self, clock=None, seconds=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls, self.clock, self.seconds = [], clock, seconds or {}

    def segments(self, input_ids):
        return None

    def forward(self, input_ids, targets, reduction="none", cu_seqlens=None):
        kind = "S" if torch.is_inference_mode_enabled() else "T"
        self.calls.append((kind, tuple(input_ids.shape)))
        if self.clock is not None:
            self.clock.now += self.seconds[kind]
        return self.w * torch.ones(input_ids.shape)


def eval_args(n_seq, stride, chunk, batch, ttt_seqs, epochs, **kw) -> tg.Hyperparameters:
    args = tg.Hyperparameters(train_seq_len=n_seq, eval_stride=stride, ttt_chunk_tokens=chunk, eval_batch_seqs=batch,
                              ttt_batch_seqs=ttt_seqs, ttt_epochs=epochs, **kw)
    args.validate()
    return args


def brute_force(args: tg.Hyperparameters, n: int, rank: int, world: int, monkeypatch) -> dict:
    """Every forward rank `rank` of `world` runs in run()'s evaluation of n targets: evaluate at stride
    TRAIN_SEQ_LEN (the pre-quant and round-trip passes alike), then evaluate_ttt, or with TTT_ENABLED=0 evaluate at
    EVAL_STRIDE (the sliding pass). The real functions, with a counting model, all_reduce a no-op and no
    exactly-once check (only this rank's share is scored)."""
    monkeypatch.setattr(tg, "all_reduce", lambda t, rt, op=None: t)
    monkeypatch.setattr(tg.ScoreBoard, "finalize", lambda self, b, rt: (0.0, 0.0))
    rt, tokens, out = tg.Runtime(rank, world, 0, CPU), torch.zeros(n + 1, dtype=torch.int64), {}
    model = out["roundtrip"] = CountingModel()
    tg.evaluate(model, tokens, None, args.train_seq_len, args, rt)
    if args.ttt_enabled:
        model = out["ttt"] = CountingModel()
        tg.evaluate_ttt(model, model, tokens, None, args, rt, lambda msg: None, math.inf)
    else:
        model = out["sliding"] = CountingModel()
        tg.evaluate(model, tokens, None, args.eval_stride, args, rt)
    return {name: model.calls for name, model in out.items()}


CASES = {  # n targets, seq_len, stride, chunk, batch, TTT batch seqs, epochs, world
    "defaults in small": (6000, 64, 16, 256, 4, 32, 3, 8),  # TTT_BATCH_SEQS above the chunk's 4 sequences
    "fewer windows than ranks": (3000, 32, 16, 64, 3, 3, 1, 8),  # 4 windows a chunk: rank 0 scores in none
    "partial steps": (5000, 32, 16, 160, 4, 2, 2, 8),  # 5 sequences a chunk at 2 a step; last chunk partial
    "stride = seq_len, 3 ranks": (4100, 32, 32, 160, 5, 4, 1, 3),  # 4 sequences a step: 2 a rank, padded
}


TTT = {"TTT": True, "no TTT": False}  # TTT_ENABLED: the final pass is TTT's, or the plain sliding pass


@pytest.mark.parametrize("ttt", TTT)
@pytest.mark.parametrize("case", CASES)
def test_work_counts_match_what_train_gpt_runs(case, ttt, monkeypatch):
    """For every rank: the score batches of each plain pass, and TTT's sequence of score batches and training
    steps chunk by chunk (with their shapes), are exactly the forwards train_gpt's own evaluation runs; the counts
    hold the round-trip pass and the final pass only (TTT's, or without TTT the sliding pass)."""
    n, seq, stride, chunk, batch, ttt_seqs, epochs, world = CASES[case]
    args = eval_args(seq, stride, chunk, batch, ttt_seqs, epochs, ttt_enabled=TTT[ttt])
    final = "ttt" if TTT[ttt] else "sliding"
    for rank in range(world):
        counts = bench.work_counts(args, n, world, rank)
        calls = brute_force(args, n, rank, world, monkeypatch)
        assert {k.split("_")[0] for k in counts} == {"n", "world", "rank", "roundtrip", final}
        for name in set(calls) - {"ttt"}:
            assert len(calls[name]) == counts[f"{name}_batches"], (rank, name)
            assert {shape for _, shape in calls[name]} <= {(batch, seq)}
        if final == "ttt":
            expected = "".join("S" * b + "T" * s for b, s in zip(counts["ttt_chunk_batches"],
                                                                 counts["ttt_chunk_steps"]))
            assert "".join(kind for kind, _ in calls["ttt"]) == expected, rank
            assert {shape for kind, shape in calls["ttt"] if kind == "T"} <= {(counts["ttt_rank_seqs"], seq)}
            assert counts["ttt_chunks"] == math.ceil(n / chunk)
            assert counts["ttt_rank_seqs"] == math.ceil(min(ttt_seqs, chunk // seq) / world)


@pytest.mark.parametrize("ttt", TTT)
@pytest.mark.parametrize("case", CASES)
def test_virtual_replay_counts_the_same_work(case, ttt):
    """The virtual replay (train_gpt's evaluate / evaluate_ttt with timing stand-ins) runs run()'s passes: pre-quant,
    round-trip, then TTT or (TTT_ENABLED=0) sliding, never both; it sees the same counts, and its total is exactly
    each pass's time ahead of it, batches x unit, steps x unit, set-up and modelled all-reduces."""
    n, seq, stride, chunk, batch, ttt_seqs, epochs, world = CASES[case]
    args = eval_args(seq, stride, chunk, batch, ttt_seqs, epochs, ttt_enabled=TTT[ttt])
    counts = bench.work_counts(args, n, world)
    ring = bench.RingModel(world, 1e11, 1e-6)
    unit = dict(prequant=1.0, roundtrip=2.0) | (dict(ttt_score=3.0, ttt_step=5.0) if TTT[ttt] else dict(sliding=7.0))
    before, overhead = dict(prequant=11.0, roundtrip=13.0), 0.5
    proj = bench.virtual_eval(args, n, world, ring, unit, before, overhead, 400, math.inf)
    final = "ttt" if TTT[ttt] else "sliding"
    assert set(proj) == {"prequant", "roundtrip", final, "total_seconds"}
    assert proj["prequant"]["batches"] == proj["roundtrip"]["batches"] == counts["roundtrip_batches"]
    if TTT[ttt]:
        assert (proj["ttt"]["batches"], proj["ttt"]["steps"]) == (counts["ttt_score_batches"], counts["ttt_steps"])
        assert not proj["ttt"]["cut"] and proj["ttt"]["trained_chunks"] == counts["ttt_chunks"] - 1
        # one gradient all-reduce a step, one decision a chunk, two at finalize
        expected = counts["ttt_steps"] * ring.seconds(400) + (counts["ttt_chunks"] - 1) * ring.seconds(4) + \
            ring.seconds(4 * n) * 2
        work = 3 * counts["ttt_score_batches"] + 5 * counts["ttt_steps"]
    else:
        assert proj["sliding"]["batches"] == counts["sliding_batches"]
        expected, work = ring.seconds(4 * n) * 2, 7 * counts["sliding_batches"]  # finalize's two all-reduces
    assert proj[final]["comm_seconds"] == pytest.approx(expected)
    assert proj["total_seconds"] == pytest.approx(
        11 + 13 + 3 * overhead + 3 * counts["roundtrip_batches"] + work
        + sum(proj[p]["comm_seconds"] for p in ("prequant", "roundtrip", final)))


@pytest.mark.parametrize("deadline", [60.0, 150.0, 400.0])
def test_virtual_replay_cuts_ttt_where_train_gpt_does(deadline, monkeypatch):
    """With the same unit times, train_gpt's real evaluate_ttt on a fake clock (each scoring forward 1 s, each
    training forward 0.5 s) and the virtual replay stop adapting after the same chunk."""
    n, world = 12_000, 8
    args = eval_args(32, 16, 128, 4, 8, 2)
    clock = bench.VirtualClock()
    model = CountingModel(clock, {"S": 1.0, "T": 0.5})
    monkeypatch.setattr(tg, "all_reduce", lambda t, rt, op=None: t)
    monkeypatch.setattr(tg.ScoreBoard, "finalize", lambda self, b, rt: (0.0, 0.0))
    monkeypatch.setattr(tg, "time", clock)
    lines = []
    tg.evaluate_ttt(model, model, torch.zeros(n + 1, dtype=torch.int64), None, args, tg.Runtime(0, world, 0, CPU),
                    lines.append, deadline)
    monkeypatch.undo()
    real_trained = int(next(line for line in lines if line.startswith("ttt chunks")).split()[4])
    unit = dict(prequant=0.0, roundtrip=0.0, ttt_score=1.0, ttt_step=0.5)
    proj = bench.virtual_eval(args, n, world, bench.RingModel(world, math.inf, 0.0), unit, {}, 0.0, 4, deadline)
    assert proj["ttt"]["trained_chunks"] == real_trained
    assert proj["ttt"]["cut"] == any(line.startswith("ttt_deadline") for line in lines)
    if deadline < 400:
        assert proj["ttt"]["cut"] and real_trained < math.ceil(n / 128) - 1


def test_ring_model():
    """2(w-1)/w * bytes / busbw + 2(w-1) * hop latency; one rank communicates nothing."""
    ring = bench.RingModel(8, 100e9, 5e-6)
    assert ring.seconds(100e6) == pytest.approx(1.75e-3 + 70e-6)
    assert bench.RingModel(1, 100e9, 5e-6).seconds(100e6) == 0.0
    measured = bench.RingModel(8, 100e9, 5e-6, table={1 << 20: 50e9, 1 << 27: 200e9})
    assert measured.seconds(1 << 21) == pytest.approx(1.75 * (1 << 21) / 50e9 + 70e-6)  # nearest in log size


def numbers(tree):
    """Every int/float in a JSON tree."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


SCRIPT_RUNS = {  # extra arguments, TTT_ENABLED
    "train, TTT": ([], "1"),
    "full, eval only, TTT": (["--full", "--eval-only", "--random-tokens"], "1"),
    "full, eval only, no TTT": (["--full", "--eval-only", "--random-tokens"], "0"),
}


def eval_table(stdout: str) -> tuple[list, float]:
    """The evaluation table the script prints: (its phases, its total seconds), read from its fixed columns
    (phase 40 characters, count 8, unit ms 10, seconds 10)."""
    phases = []
    for line in stdout[stdout.index("\nEVALUATION"):].splitlines()[3:]:
        if line.startswith("total "):
            return phases, float(line[58:68])
        phases.append(line[:40].strip())


@pytest.mark.parametrize("run", SCRIPT_RUNS)
def test_script_prints_a_projection_on_cpu(run, tmp_path, tokenizer, data_dir):
    """The script's main path runs on CPU with a tiny model (depth recurrence on, so both training graphs are
    timed) and prints a projection whose numbers are finite, with positive times and counts. Its evaluation is
    run()'s: with TTT no sliding pass anywhere (table, total, counts, JSON); without TTT the sliding pass is the
    final pass and nothing of TTT appears. The table's phases add up to its total (with --full, to the full run's
    total too)."""
    extra, ttt = SCRIPT_RUNS[run]
    model = tiny_model_env(tokenizer.vocab_size, num_loops=1, loop_start=0, loop_end=0)
    env = script_env(**{**TINY_ENV, "ITERATIONS": "1000000"}, **model, DATA_PATH=str(data_dir),  # the clock stops it
                     TTT_ENABLED=ttt)
    out = tmp_path / "projection.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "20000", "--train-steps", "2", "--sample-batches",
                           "2", "--sample-chunks", "2", "--json", str(out), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== projected 8-GPU run: rank 0 of 8" in proc.stdout and "EVALUATION" in proc.stdout
    result = json.loads(out.read_text())
    assert all(math.isfinite(x) for x in numbers(result))
    m, counts, proj = result["eval_measured"], result["counts"], result["eval_projection"]
    final, absent = ("ttt", "sliding") if ttt == "1" else ("sliding", "ttt")
    assert min(m[k] for k in ("compress_seconds", "load_seconds", "prequant_batch_s", "roundtrip_batch_s")) > 0
    assert min(counts[k] for k in ("roundtrip_batches", bench.BATCH_KEYS[final])) > 0
    assert set(proj) == {"prequant", "roundtrip", final, "total_seconds"} and proj["total_seconds"] > 0
    assert not any(absent in k for k in (*m, *m["full"], *counts)), absent
    rows, (phases, total) = bench.eval_rows(tg.Hyperparameters.from_env(env)[0], m, proj), eval_table(proc.stdout)
    assert phases == [row[0] for row in rows] and total == pytest.approx(proj["total_seconds"], abs=0.051)
    assert sum(row[3] for row in rows) == pytest.approx(proj["total_seconds"])
    if "--full" in extra:
        assert sum(row[4] for row in rows if row[4] is not None) == pytest.approx(m["full"]["total"])
    report = proc.stdout[proc.stdout.index("\nEVALUATION"):]
    if final == "ttt":
        assert m["ttt"]["score_batch_s"] > 0 and m["ttt"]["step_s"] > 0 and counts["ttt_steps"] > 0
        assert {"TTT score (stride 32)", "TTT train (1 x 64 per step)"} <= set(phases)
        assert "sliding" not in report
    else:
        assert m["sliding_batch_s"] > 0 and "sliding pass (stride 32)" in phases and "TTT" not in report
    if "--eval-only" in extra:
        assert result["training"] is None and "full run" in proc.stdout
        assert m["full"][final] > 0 and m["full"]["total"] > 0
        if final == "ttt":
            assert m["full"]["ttt_trained_chunks"] == counts["ttt_chunks"] - 1
    else:
        train, tproj = result["training"], result["training_projection"]
        assert set(train) == {"plain", "loop"} and train["loop"]["passes"] == train["plain"]["passes"] + 1
        assert min(t["step_ms"] for t in train.values()) > 0
        assert tproj["steps"] > 0 and tproj["train_seconds"] > tproj["budget_seconds"]
