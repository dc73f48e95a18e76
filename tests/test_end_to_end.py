"""End to end: `python3 train_gpt.py` on tiny synthetic shards trains, writes the artifact, scores it, and
an EVAL_ONLY run of that artifact reproduces the final score exactly."""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_ENV, TRAIN_GPT, script_env, tg, tiny_model_env

CODE = TRAIN_GPT.read_bytes()
SEQ = int(TINY_ENV["TRAIN_SEQ_LEN"])


def run_script(cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TRAIN_GPT)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def log_line(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return found[0]


def number(line: str, key: str) -> float:
    m = re.search(rf"\b{key} (\S+)", line)
    assert m, (key, line)
    return float(m.group(1).removesuffix("s"))


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, tokenizer, data_dir):
    cwd = tmp_path_factory.mktemp("e2e")
    # hidden 64 * 16.5 = 1056: the MLP matrices (67,584 weights) exceed QUANT_MIN_NUMEL, so the run also
    # goes through Hessian collection, GPTQ int6 and the step-size search, not only fp16 storage.
    env = script_env(**TINY_ENV, **tiny_model_env(tokenizer.vocab_size, mlp_mult=16.5), DATA_PATH=str(data_dir),
                     TOKENIZER_PATH=str(tokenizer.path))
    run_script(cwd, env)
    return cwd, env


@pytest.fixture(scope="module")
def eval_only_run(training_run):
    cwd, env = training_run
    # MLP_MULT differs from the artifact's 16.5: the artifact's configuration is used, and the log says so
    run_script(cwd, {**env, "EVAL_ONLY": "1", "ARTIFACT": str(cwd / "final_model.int6.ptz"),
                     "SCORES_PATH": "scores2.npy", "MLP_MULT": "3"})
    return cwd


@pytest.fixture(scope="module")
def val_tokens(data_dir):
    """The validation stream as the challenge cuts it: a multiple of TRAIN_SEQ_LEN targets, plus one."""
    tokens = np.asarray(tg.open_shard(str(data_dir / "fineweb_val_000000.bin"))).astype(np.int64)
    n_targets = (tokens.size - 1) // SEQ * SEQ
    return torch.from_numpy(tokens[: n_targets + 1])


def test_outputs_and_submission(training_run):
    """The run leaves an artifact, a log and a submission.json whose byte counts are the real file sizes."""
    cwd, _ = training_run
    artifact, log, sub_path = cwd / "final_model.int6.ptz", cwd / "train_log.txt", cwd / "submission.json"
    assert artifact.is_file() and log.is_file() and sub_path.is_file()
    sub = json.loads(sub_path.read_text())
    assert sub["name"] == tg.SUBMISSION_NAME
    assert math.isfinite(sub["val_bpb"]) and sub["val_bpb"] > 0
    assert math.isfinite(sub["val_loss"]) and sub["val_loss"] > 0
    assert sub["bytes_code"] == len(CODE)
    assert sub["bytes_model"] == artifact.stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"]
    assert sub["steps"] == 20
    assert sub["train_within_limit"] is True and sub["eval_within_limit"] is True
    assert not [p.name for p in cwd.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporary file


def test_log_lines(training_run):
    """The log carries the code hash, every final score, and byte totals equal to artifact + code size."""
    cwd, _ = training_run
    lines = (cwd / "train_log.txt").read_text().splitlines()
    assert log_line(lines, "code_sha256 ").split()[1] == hashlib.sha256(CODE).hexdigest()
    for prefix in ("final pre_quant ", "final roundtrip ", "final ttt "):
        line = log_line(lines, prefix)
        assert math.isfinite(number(line, "val_bpb")) and number(line, "val_bpb") > 0
    assert not [line for line in lines if line.startswith("final sliding ")]  # TTT's pass is the sliding pass
    # each phase logs the evaluation seconds so far: the phases are timed, in pipeline order
    phases = ("artifact written ", "final pre_quant ", "eval_graphs compiled ", "final roundtrip ", "final ttt ")
    times = [number(log_line(lines, p), "in" if p == "artifact written " else "eval_time") for p in phases]
    assert times == sorted(times) and number(log_line(lines, "eval_seconds "), "eval_seconds") >= times[-1]
    # the artifact is on disk before any evaluation starts, the pre-quant diagnostic included
    assert lines.index(log_line(lines, "artifact written ")) < lines.index(log_line(lines, "final pre_quant "))
    assert number(log_line(lines, "artifact written "), "step_scale") >= 1.0
    expected_total = (cwd / "final_model.int6.ptz").stat().st_size + len(CODE)
    assert number(log_line(lines, "artifact final_model.int6.ptz "), "bytes_total") == expected_total
    assert number(log_line(lines, "final val_loss "), "bytes_total") == expected_total
    # the final score is the TTT score, and the submission reports it
    final, ttt = log_line(lines, "final val_loss "), log_line(lines, "final ttt ")
    assert number(final, "val_bpb") == number(ttt, "val_bpb")
    assert json.loads((cwd / "submission.json").read_text())["val_bpb"] == number(final, "val_bpb")
    assert lines[-1] == "run_end status=ok"


def test_training_learned_and_quantization_is_mild(training_run, tokenizer):
    """20 steps beat a uniform guess by a clear margin; the artifact round trip costs little."""
    cwd, _ = training_run
    lines = (cwd / "train_log.txt").read_text().splitlines()
    pre = number(log_line(lines, "final pre_quant "), "val_loss")
    post = number(log_line(lines, "final roundtrip "), "val_loss")
    assert pre < math.log(tokenizer.vocab_size) - 0.5
    assert abs(post - pre) < 0.05


def test_artifact_contents(training_run, tokenizer):
    """The artifact's header is the configured model; the MLP matrices are int6 codes, while tensors below
    QUANT_MIN_NUMEL (attention matrices, the 320x64 embedding) are stored as fp16."""
    cwd, _ = training_run
    config, entries = tg.unpack_artifact((cwd / "final_model.int6.ptz").read_bytes())
    assert config["vocab_size"] == tokenizer.vocab_size and config["num_layers"] == 2
    assert config["model_dim"] == 64 and config["max_seq_len"] == SEQ and config["bos_id"] == 1
    kinds = {name: e["kind"] for name, e in entries.items()}
    assert kinds["blocks.0.mlp.fc.weight"] == kinds["blocks.1.mlp.proj.weight"] == "int6"
    assert kinds["blocks.0.attn.c_q.weight"] == "fp16" and kinds["tok_emb.weight"] == "fp16"
    for e in entries.values():
        if e["kind"] == "int6":
            assert int(e["q"].abs().max()) <= tg.INT6_MAX


def test_scores_file(training_run, val_tokens, tokenizer):
    """scores.npy holds one float32 NLL per validation target; its mean is the final val_loss and its
    sum over the target bytes (computed here from the shard) is the final val_bpb."""
    cwd, _ = training_run
    scores = np.load(cwd / "scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (val_tokens.numel() - 1,)
    assert bool(np.isfinite(scores).all()) and bool((scores > 0).all())
    final = log_line((cwd / "train_log.txt").read_text().splitlines(), "final val_loss ")
    assert float(scores.astype(np.float64).mean()) == pytest.approx(number(final, "val_loss"), abs=1e-5)
    n_bytes = int(tg.target_bytes(val_tokens, tg.byte_tables(tokenizer.sp)).sum())
    bpb = float(scores.astype(np.float64).sum()) / math.log(2) / n_bytes
    assert bpb == pytest.approx(number(final, "val_bpb"), abs=1e-5)


def test_eval_only_reproduces(training_run, eval_only_run):
    """EVAL_ONLY=1 on the written artifact gives the same final line and bit-identical per-token scores."""
    cwd = eval_only_run
    train_lines = (cwd / "train_log.txt").read_text().splitlines()
    eval_lines = (cwd / "eval_log.txt").read_text().splitlines()
    for prefix in ("final val_loss ", "final roundtrip "):
        assert log_line(eval_lines, prefix).split(" eval_time")[0] == log_line(train_lines, prefix).split(" eval_time")[0]
    assert not any(line.startswith("final pre_quant") for line in eval_lines)
    np.testing.assert_array_equal(np.load(cwd / "scores2.npy"), np.load(cwd / "scores.npy"))


def test_eval_only_logs_the_artifact_config(training_run, eval_only_run):
    """EVAL_ONLY logs the configuration stored in the artifact and warns where the environment differs."""
    eval_lines = (eval_only_run / "eval_log.txt").read_text().splitlines()
    config = json.loads(log_line(eval_lines, "artifact_config ").split(" ", 1)[1])
    assert config == tg.unpack_artifact((eval_only_run / "final_model.int6.ptz").read_bytes())[0]
    assert config["mlp_mult"] == 16.5
    assert log_line(eval_lines, "WARNING: ") == "WARNING: MLP_MULT=3.0 differs from the artifact's 16.5, which is used"
    assert eval_lines[-1] == "run_end status=ok"


def test_depth_recurrence_end_to_end(tmp_path, tokenizer, data_dir):
    """With NUM_LOOPS and LOOP_FROM=0.5 the run switches the extra passes on halfway (after warm-up
    compiled both graphs), and the artifact's model runs them: EVAL_ONLY of it reproduces the score."""
    env = script_env(**TINY_ENV, **tiny_model_env(tokenizer.vocab_size, mlp_mult=16.5), DATA_PATH=str(data_dir),
                     TOKENIZER_PATH=str(tokenizer.path))
    env.update(NUM_LAYERS="3", XSA_LAST_N="1", NUM_LOOPS="1", LOOP_START="0", LOOP_END="1", LOOP_FROM="0.5",
               TTT_ENABLED="0")
    run_script(tmp_path, env)
    lines = (tmp_path / "train_log.txt").read_text().splitlines()
    assert number(log_line(lines, "depth_recurrence on at step"), "step") == 10  # of ITERATIONS=20
    config, _ = tg.unpack_artifact((tmp_path / "final_model.int6.ptz").read_bytes())
    assert (config["num_loops"], config["loop_start"], config["loop_end"]) == (1, 0, 1)
    model, _ = tg.load_artifact_model(str(tmp_path / "final_model.int6.ptz"), torch.device("cpu"))
    assert model.looping and model.orders[True] == [0, 1, 0, 1, 2]
    run_script(tmp_path, {**env, "EVAL_ONLY": "1", "ARTIFACT": str(tmp_path / "final_model.int6.ptz")})
    final = number(log_line(lines, "final val_loss"), "val_bpb")
    eval_lines = (tmp_path / "eval_log.txt").read_text().splitlines()
    assert number(log_line(eval_lines, "final val_loss"), "val_bpb") == final


def test_lora_ttt_end_to_end(training_run, val_tokens):
    """EVAL_ONLY with other LoRA TTT settings: the round-trip score is the training run's, the final pass is the
    per-document LoRA TTT with those settings (every target once: the scores file holds one value per target, every
    step adapts without a deadline), and the run ends ok."""
    cwd, env = training_run
    run_script(cwd, {**env, "EVAL_ONLY": "1", "ARTIFACT": str(cwd / "final_model.int6.ptz"),
                     "TTT_LORA_CHUNK": "8", "TTT_LORA_DOCS": "8", "TTT_LORA_ROWS": "8",
                     "TTT_LORA_RANK": "4",
                     "LOG_PATH": "lora_log.txt", "SCORES_PATH": "scores_lora.npy"})
    train_lines, lines = (cwd / "train_log.txt").read_text().splitlines(), (cwd / "lora_log.txt").read_text().splitlines()
    assert log_line(lines, "final roundtrip ").split(" eval_time")[0] == \
        log_line(train_lines, "final roundtrip ").split(" eval_time")[0]
    assert number(log_line(lines, "ttt documents "), "adapted") == number(log_line(lines, "ttt documents "), "steps")
    assert number(log_line(lines, "ttt documents "), "rows") == 8
    scores = np.load(cwd / "scores_lora.npy")
    assert scores.shape == (val_tokens.numel() - 1,) and np.isfinite(scores).all()
    assert number(log_line(lines, "final ttt "), "val_bpb") == number(log_line(lines, "final val_loss "), "val_bpb")
    assert lines[-1] == "run_end status=ok"
