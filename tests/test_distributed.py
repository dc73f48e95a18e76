"""Several ranks behave like one: the same global batch on 1, 2 and 4 CPU processes (gloo).

Each run is train_gpt.py under torch.distributed.run with a tiny model. The global batch is fixed
(1,024 tokens); gradient accumulation makes up the rest (4 micro-batches on 1 rank, 2 on 2, 1 on 4).
These are the code paths of a multi-GPU run (DDP, Muon's sharded updates, the depth-recurrence
switch agreed by all ranks, rank-0 GPTQ, split scoring, TTT gradient all-reduce) with gloo in place
of NCCL.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import TRAIN_GPT, script_env, tiny_model_env

RANKS = (1, 2, 4)


def launch(cwd, nproc: int, env: dict) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN_GPT)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step \d+ train_loss ([\d.]+)", log, re.M)]


def final(log: str, what: str) -> float:
    return float(re.search(rf"^final {what} val_loss \S+ val_bpb ([\d.]+)", log, re.M).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, tokenizer):
    """Train on 1, 2 and 4 ranks; evaluate the 1-rank artifact on 2 and 4 ranks (EVAL_ONLY)."""
    base = dict(
        **tiny_model_env(tokenizer.vocab_size, num_layers=3, num_loops=1, loop_start=0, loop_end=1),
        LOOP_FROM="0.5", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer.path),
        TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024",
        MICRO_BATCH_TOKENS="256", ITERATIONS="6", WARMUP_STEPS="1", LOG_EVERY="1", GPTQ_CALIB_BATCHES="1",
        GPTQ_RESERVE_SECONDS="1", EVAL_STRIDE="32", EVAL_BATCH_SEQS="4", TTT_LORA_CHUNK="16",
        TTT_LORA_DOCS="4", TTT_LORA_ROWS="4", TTT_LORA_LR="0.01", EMA_DECAY="0.5", OMP_NUM_THREADS="1",
    )
    out = {}
    for n in RANKS:
        d = tmp_path_factory.mktemp(f"train{n}")
        log = launch(d, n, script_env(**base, SCORES_PATH="scores.npy"))
        out[("train", n)] = (log, np.load(d / "scores.npy"), d / "final_model.int6.ptz")
    artifact = out[("train", 1)][2]
    for n in RANKS[1:]:
        d = tmp_path_factory.mktemp(f"eval{n}")
        log = launch(d, n, script_env(**base, EVAL_ONLY="1", ARTIFACT=str(artifact), SCORES_PATH="scores.npy"))
        out[("eval", n)] = (log, np.load(d / "scores.npy"), artifact)
    return out


def test_training_losses_match_across_rank_counts(runs):
    """The same global batch gives the same training losses whatever the number of ranks."""
    ref = losses(runs[("train", 1)][0])
    assert len(ref) == 6
    for n in RANKS:
        assert "depth_recurrence on at step 3 passes 5 (from 3)" in runs[("train", n)][0]
    for n in RANKS[1:]:
        got = losses(runs[("train", n)][0])
        assert len(got) == len(ref)
        assert np.allclose(got, ref, atol=2e-4), (n, got, ref)


def test_evaluation_of_one_artifact_matches_across_rank_counts(runs):
    """EVAL_ONLY of one artifact: round-trip and TTT bpb agree within 1e-4, every token scored once."""
    ref_log, ref_scores, _ = runs[("train", 1)]
    for n in RANKS[1:]:
        log, scores, _ = runs[("eval", n)]
        assert scores.shape == ref_scores.shape
        assert abs(final(log, "roundtrip") - final(ref_log, "roundtrip")) < 1e-4
        assert abs(final(log, "ttt") - final(ref_log, "ttt")) < 1e-4
        assert np.allclose(scores, ref_scores, atol=1e-3)
        assert f"world_size {n}" in log
