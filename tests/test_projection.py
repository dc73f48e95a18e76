"""bench/project_8gpu.py: its work counts are what train_gpt's evaluate / evaluate_ttt really run on a rank of
8, its virtual replay stops TTT's adaptation where train_gpt's deadline rule does, and its main path runs on CPU."""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import BOS, CPU, REPO_ROOT, TINY_ENV, script_env, tg, tiny_model, tiny_model_env

SCRIPT = REPO_ROOT / "bench" / "project_8gpu.py"
_spec = importlib.util.spec_from_file_location("project_8gpu", SCRIPT)
bench = sys.modules["project_8gpu"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(bench)


class CountingModel(torch.nn.Module):
    """Stands in for the compiled model in train_gpt's plain passes: records the shape of every forward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def segments(self, input_ids):
        return None

    def forward(self, input_ids, targets, reduction="none", cu_seqlens=None):
        self.calls.append(tuple(input_ids.shape))
        return torch.zeros(input_ids.shape)


class StepRecorder:
    """Stands in for train_gpt.lora_step inside the real evaluate_ttt: records each step on the stream (its plan
    rows, width, whether it adapts; its batch shape in `shapes`: rows, width, window slots) and, the warm-up step
    on random tokens apart, does no work. With a clock it advances it by seconds[adapting] per step (the warm-up step
    included)."""

    def __init__(self, stream, clock=None, seconds=None):
        self.stream, self.clock, self.seconds, self.steps, self.warmups = stream, clock, seconds, [], 0
        self.shapes = set()

    def __call__(self, model_fn, lora, tokens, plan, width, board, adapting, lr):
        if self.clock is not None:
            self.clock.now += self.seconds[adapting]
        if tokens is self.stream:
            self.steps.append((plan.clone(), width, adapting))
            self.shapes.add((lora.rows, width, len(plan)))
        else:
            self.warmups += 1


def doc_stream(n: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """n+1 random tokens (ids 2..319) with BOS at random positions, about one in mean_doc; the stream does not
    start with BOS (a partial first document)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 320, (n + 1,), generator=g)
    return torch.where(torch.rand(n + 1, generator=g) < 1 / mean_doc, BOS, tokens)


def eval_args(seq, stride, batch, chunk, rows, **kw) -> tg.Hyperparameters:
    args = tg.Hyperparameters(vocab_size=320, train_seq_len=seq, eval_stride=stride, eval_batch_seqs=batch,
                              ttt_lora_chunk=chunk, ttt_lora_rows=rows, ttt_lora_docs=2 * rows,
                              ttt_lora_rank=2, **kw)
    args.validate()
    return args


def brute_force(args: tg.Hyperparameters, tokens: torch.Tensor, rank: int, world: int, monkeypatch) -> dict:
    """What rank `rank` of `world` runs in run()'s evaluation of the stream: the forwards of evaluate at stride
    TRAIN_SEQ_LEN (the pre-quant and round-trip passes alike) and, with TTT_ENABLED=0, at EVAL_STRIDE (the sliding
    pass); with TTT, the lora_step calls of the real evaluate_ttt on a tiny model (a StepRecorder). all_reduce is a
    no-op and finalize skips the exactly-once check (only this rank's share is scored)."""
    monkeypatch.setattr(tg, "all_reduce", lambda t, rt, op=None: t)
    monkeypatch.setattr(tg.ScoreBoard, "finalize", lambda self, b, rt: (0.0, 0.0))
    rt, out = tg.Runtime(rank, world, 0, CPU), {}
    out["roundtrip"] = CountingModel()
    tg.evaluate(out["roundtrip"], tokens, None, args.train_seq_len, args, rt)
    if args.ttt_enabled:
        out["ttt"] = StepRecorder(tokens)
        monkeypatch.setattr(tg, "lora_step", out["ttt"])
        tg.evaluate_ttt(tiny_model(doc_mask=True), tokens, None, args, rt, lambda msg: None, math.inf)
    else:
        out["sliding"] = CountingModel()
        tg.evaluate(out["sliding"], tokens, None, args.eval_stride, args, rt)
    return out


CASES = {  # n targets, mean document length, seq_len, stride, batch, LoRA chunk, LoRA rows, world
    "defaults in small": (6000, 40, 64, 16, 4, 16, 4, 8),
    "documents longer than a window": (5000, 200, 32, 16, 4, 8, 3, 8),  # windows slide inside a document
    "fewer documents than ranks": (3000, 1000, 32, 16, 3, 8, 2, 8),  # some ranks get no document
    "chunk = seq_len, 3 ranks": (4100, 60, 32, 32, 5, 32, 4, 3),
}


TTT = {"TTT": True, "no TTT": False}  # TTT_ENABLED: the final pass is TTT's, or the plain sliding pass


@pytest.mark.parametrize("ttt", TTT)
@pytest.mark.parametrize("case", CASES)
def test_work_counts_match_what_train_gpt_runs(case, ttt, monkeypatch):
    """For every rank: the score batches of each plain pass are exactly the forwards train_gpt's evaluate runs, and
    TTT's documents, steps, steps in which some window trains, windows (in all, most in a step), targets and
    row-tokens are exactly those of the lora_step calls of train_gpt's evaluate_ttt (each TTT_LORA_ROWS x
    TRAIN_SEQ_LEN tokens with TTT_LORA_DOCS window slots, adapting with no deadline);
    the ranks' documents and targets add up to the stream's. The counts hold the round-trip pass and the final
    pass only (TTT's, or without TTT the sliding pass)."""
    n, mean_doc, seq, stride, batch, chunk, rows, world = CASES[case]
    args, tokens = eval_args(seq, stride, batch, chunk, rows, ttt_enabled=TTT[ttt]), doc_stream(n, mean_doc)
    final, documents, targets = ("ttt" if TTT[ttt] else "sliding"), 0, 0
    for rank in range(world):
        counts = bench.work_counts(args, tokens, world, rank)
        ran = brute_force(args, tokens, rank, world, monkeypatch)
        assert {k.split("_")[0] for k in counts} == {"n", "world", "rank", "roundtrip", final}
        for name in set(ran) - {"ttt"}:
            assert len(ran[name].calls) == counts[f"{name}_batches"], (rank, name)
            assert set(ran[name].calls) <= {(batch, seq)}
        if final == "ttt":
            steps = ran["ttt"].steps
            plans = torch.stack([plan for plan, _, _ in steps]) if steps else torch.zeros(0, 2 * rows, 7).long()
            assert ran["ttt"].warmups == 1 and {(w, a) for _, w, a in steps} <= {(seq, True)}
            assert ran["ttt"].shapes <= {(rows, seq, 2 * rows)}
            windows = (plans[:, :, 1] > 0).sum(1)
            assert counts["ttt_windows"] == int(windows.sum()) and counts["ttt_max_windows"] == max(windows, default=0)
            assert counts["ttt_steps"] == len(steps), rank
            assert counts["ttt_documents"] == int(plans[:, :, 4].sum()), rank
            assert counts["ttt_training_steps"] == int(plans[:, :, 3].any(1).sum()), rank
            assert counts["ttt_targets"] == int((plans[:, :, 1] - plans[:, :, 2]).sum()), rank
            assert counts["ttt_row_tokens_read"] == int(plans[:, :, 1].sum()), rank
            assert counts["ttt_row_tokens"] == len(steps) * rows * seq
            documents, targets = documents + counts["ttt_documents"], targets + counts["ttt_targets"]
    if final == "ttt":
        assert (documents, targets) == (counts["ttt_all_documents"], n)
        assert documents == len(tg.document_spans(tokens, BOS)[0])


@pytest.mark.parametrize("ttt", TTT)
@pytest.mark.parametrize("case", CASES)
def test_virtual_replay_counts_the_same_work(case, ttt):
    """The virtual replay (train_gpt's evaluate / evaluate_ttt with timing stand-ins) runs run()'s passes: pre-quant,
    round-trip, then TTT or (TTT_ENABLED=0) sliding, never both; it sees the same counts, and its total is exactly
    each pass's time ahead of it, batches x unit, TTT's warm-up and steps x unit (all adapting without a
    deadline), set-up and modelled all-reduces (TTT's: only its finalize's two)."""
    n, mean_doc, seq, stride, batch, chunk, rows, world = CASES[case]
    args, tokens = eval_args(seq, stride, batch, chunk, rows, ttt_enabled=TTT[ttt]), doc_stream(n, mean_doc)
    counts = bench.work_counts(args, tokens, world)
    ring = bench.RingModel(world, 1e11, 1e-6)
    unit = dict(prequant=1.0, roundtrip=2.0) | (dict(ttt_warmup=17.0, ttt_adapting=5.0, ttt_scoring=3.0) if TTT[ttt]
                                                else dict(sliding=7.0))
    before, overhead = dict(prequant=11.0, roundtrip=13.0, ttt=19.0), 0.5
    proj = bench.virtual_eval(args, tokens, world, ring, unit, before, overhead, math.inf)
    final = "ttt" if TTT[ttt] else "sliding"
    assert set(proj) == {"prequant", "roundtrip", final, "total_seconds"}
    assert proj["prequant"]["batches"] == proj["roundtrip"]["batches"] == counts["roundtrip_batches"]
    if TTT[ttt]:
        assert proj["ttt"]["steps"] == proj["ttt"]["adapted"] == counts["ttt_steps"] and not proj["ttt"]["cut"]
        work = 19 + 17 + 5 * counts["ttt_steps"]
    else:
        assert proj["sliding"]["batches"] == counts["sliding_batches"]
        work = 7 * counts["sliding_batches"]
    assert proj[final]["comm_seconds"] == pytest.approx(ring.seconds(4 * n) * 2)  # finalize's two all-reduces
    assert proj["total_seconds"] == pytest.approx(
        11 + 13 + 3 * overhead + 3 * counts["roundtrip_batches"] + work
        + sum(proj[p]["comm_seconds"] for p in ("prequant", "roundtrip", final)))


@pytest.mark.parametrize("deadline", [200.0, 260.0, 300.0, 1000.0])
def test_virtual_replay_cuts_ttt_where_train_gpt_does(deadline, monkeypatch):
    """With the same costs, train_gpt's real evaluate_ttt on a fake clock (its compile 40 s, each step 2 s adapting
    and 1 s scoring only, the warm-up step adapting) and the virtual replay stop adapting after the same step, or
    both never do; the lower deadlines do cut (and the cut leaves steps to score only)."""
    n, world, seq, chunk, rows = 40_000, 8, 32, 8, 4
    args, tokens = eval_args(seq, 16, 4, chunk, rows), doc_stream(n, 40)
    monkeypatch.setattr(tg, "LORA_CHECK_EVERY", 4)
    clock = bench.VirtualClock()

    @contextlib.contextmanager
    def compile_model(model, device):
        clock.now += 40.0
        yield model

    real = StepRecorder(tokens, clock, {True: 2.0, False: 1.0})
    with bench.patched(tg, all_reduce=lambda t, rt, op=None: t, time=clock, lora_step=real,
                       compiled_blocks=compile_model), \
            bench.patched(tg.ScoreBoard, finalize=lambda self, b, rt: (0.0, 0.0)):
        tg.evaluate_ttt(tiny_model(doc_mask=True), tokens, None, args, tg.Runtime(0, world, 0, CPU), lambda msg: None,
                        deadline)
    adapted = sum(adapting for _, _, adapting in real.steps)
    unit = dict(prequant=0.0, roundtrip=0.0, ttt_warmup=42.0, ttt_adapting=2.0, ttt_scoring=1.0)
    proj = bench.virtual_eval(args, tokens, world, bench.RingModel(world, math.inf, 0.0), unit, {}, 0.0, deadline)
    assert (proj["ttt"]["adapted"], proj["ttt"]["steps"]) == (adapted, len(real.steps))
    assert proj["ttt"]["cut"] == (adapted < len(real.steps)) == (deadline < 1000)
    assert proj["ttt"]["seconds"] == pytest.approx(clock.now)
    assert any(line.startswith("ttt_deadline") for line in proj["ttt"]["log"]) == proj["ttt"]["cut"]


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


def test_evaluation_plays_the_busiest_rank():
    """busiest_rank picks the rank with the most final-pass work (TTT steps; sliding batches without TTT), and
    virtual_eval replays that rank's plan: its TTT steps are that rank's count, not rank 0's."""
    g = torch.Generator().manual_seed(11)  # ranks 0-6: 12 one-chunk documents each; rank 7: one of 12 chunks
    docs = [16] * 84 + [192]
    stream = torch.cat([torch.cat((torch.tensor([BOS]), torch.randint(3, 320, (n - 1,), generator=g))) for n in docs]
                       + [torch.tensor([5])])
    for ttt in (True, False):
        args = tg.Hyperparameters(vocab_size=320, train_seq_len=64, eval_stride=32, eval_batch_seqs=4,
                                  ttt_lora_chunk=16, ttt_lora_rows=3, ttt_lora_docs=3, ttt_enabled=ttt)
        rank, every = bench.busiest_rank(args, stream, 8)
        key = "ttt_steps" if ttt else "sliding_batches"
        assert every[rank][key] == max(c[key] for c in every) and all(c["rank"] == r for r, c in enumerate(every))
        if ttt:
            assert rank == 7 and every[7][key] == 12 > every[0][key]  # rank 0 is not the busiest
            unit = dict(prequant=1e-3, roundtrip=1e-3, ttt_warmup=1.0, ttt_adapting=0.1, ttt_scoring=0.05)
            ring = bench.RingModel(world=8, busbw=1e11, hop_latency=0.0)
            replay = bench.virtual_eval(args, stream, 8, ring, unit, collections.defaultdict(float), 0.0, math.inf,
                                        rank)
            assert replay["ttt"]["steps"] == every[rank]["ttt_steps"]


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
    run()'s: with TTT no sliding pass anywhere (table, total, counts, JSON), and TTT's rows (set-up, compile,
    steps adapting and scoring only: every step adapts within the default deadline); without TTT the sliding pass
    is the final pass and nothing of TTT appears. The table's phases add up to its total (with --full, to the full
    run's total too, whose TTT ran all of the evaluated rank's steps). The evaluation plays the busiest rank."""
    extra, ttt = SCRIPT_RUNS[run]
    model = tiny_model_env(tokenizer.vocab_size, num_loops=1, loop_start=0, loop_end=0)
    env = script_env(**{**TINY_ENV, "ITERATIONS": "1000000"}, **model, DATA_PATH=str(data_dir),  # the clock stops it
                     TTT_ENABLED=ttt)
    out = tmp_path / "projection.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "20000", "--train-steps", "2", "--sample-batches",
                           "2", "--sample-steps", "2", "--json", str(out), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== projected 8-GPU run, measured on" in proc.stdout and "EVALUATION" in proc.stdout
    result = json.loads(out.read_text())
    rank, every = bench.busiest_rank(tg.Hyperparameters.from_env(env)[0], bench.stand_in_stream(
        tg.Hyperparameters.from_env(env)[0], 20000, "--random-tokens" in extra)[0], 8)
    assert result["counts"] == every[rank] and f"EVALUATION (rank {rank} of 8, the busiest;" in proc.stdout
    assert all(math.isfinite(x) for x in numbers(result))
    m, counts, proj = result["eval_measured"], result["counts"], result["eval_projection"]
    final, absent = ("ttt", "sliding") if ttt == "1" else ("sliding", "ttt")
    assert min(m[k] for k in ("compress_seconds", "load_seconds", "prequant_batch_s", "roundtrip_batch_s")) > 0
    assert min(counts[k] for k in ("roundtrip_batches", "ttt_steps" if final == "ttt" else "sliding_batches")) > 0
    assert set(proj) == {"prequant", "roundtrip", final, "total_seconds"} and proj["total_seconds"] > 0
    assert not any(absent in k for k in (*m, *m["full"], *counts)), absent
    rows, (phases, total) = bench.eval_rows(tg.Hyperparameters.from_env(env)[0], m, proj), eval_table(proc.stdout)
    assert phases == [row[0] for row in rows] and total == pytest.approx(proj["total_seconds"], abs=0.051)
    assert sum(row[3] for row in rows) == pytest.approx(proj["total_seconds"])
    if "--full" in extra:
        assert sum(row[4] for row in rows if row[4] is not None) == pytest.approx(m["full"]["total"])
    report = proc.stdout[proc.stdout.index("\nEVALUATION"):]
    if final == "ttt":
        t, steps = m["ttt"], counts["ttt_steps"]
        assert min(t[k] for k in ("setup_seconds", "warmup_seconds", "adapting_step_s", "scoring_step_s")) > 0
        assert t["steps_sampled"] == 2 and steps > 4 and proj["ttt"]["adapted"] == steps and not proj["ttt"]["cut"]
        assert phases[6:10] == ["TTT set-up (documents, plan, adapters)", "TTT compile + warm-up",
                                "TTT steps (4 x 64, adapting)", "TTT steps (4 x 64, scoring only)"]
        assert [row[1] for row in rows[6:10]] == [1, 1, steps, 0]
        assert f"TTT deadline not reached: all {steps:,} steps adapt" in report and "sliding" not in report
    else:
        assert m["sliding_batch_s"] > 0 and "sliding pass (stride 32)" in phases and "TTT" not in report
    if "--eval-only" in extra:
        assert result["training"] is None and "full run" in proc.stdout
        assert m["full"]["total"] > 0
        if final == "ttt":
            assert m["full"]["ttt_adapted"] == counts["ttt_steps"] and m["full"]["ttt_adapting"] > 0
            assert f"full run: TTT adapted {counts['ttt_steps']:,} of" in report
        else:
            assert m["full"]["sliding"] > 0
    else:
        train, tproj = result["training"], result["training_projection"]
        assert set(train) == {"plain", "loop"} and train["loop"]["passes"] == train["plain"]["passes"] + 1
        assert min(t["step_ms"] for t in train.values()) > 0
        assert tproj["steps"] > 0 and tproj["train_seconds"] > tproj["budget_seconds"]
