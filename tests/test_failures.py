"""Nothing lost, nothing that lies (issue 13): bad outputs, bad input, divergence, kills and over-limit runs.

Checks that need no training call main() in-process on the tiny configuration and expect it to stop
before any data is read or any step runs; the others train for a few steps. Every test writes only
into its own temporary folder.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import TINY_ENV, TRAIN_GPT, make_documents, runtime, script_env, tg, tiny_config, tiny_model, \
    tiny_model_env


def run_main(monkeypatch, cwd, tokenizer, data_dir, **overrides) -> int:
    """tg.main() in `cwd` with the tiny configuration plus overrides, no other setting from the caller's env."""
    for name in [f.name.upper() for f in tg.fields(tg.Hyperparameters)] + ["RANK", "WORLD_SIZE", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    env = {**TINY_ENV, **tiny_model_env(tokenizer.vocab_size), "DATA_PATH": str(data_dir),
           "TOKENIZER_PATH": str(tokenizer.path), **overrides}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    return tg.main()


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN/Infinity (not JSON, though Python's json writes them by default)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


@pytest.fixture
def empty_dir(tmp_path):
    d = tmp_path / "no_data"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------------------------
# outputs: pre-flight and atomic writes
# ----------------------------------------------------------------------------------------------


def test_output_folders_created_before_data_is_read(monkeypatch, tmp_path, tokenizer, empty_dir):
    """Every output's missing folder is created (and found writable) before the data check fails."""
    out = {"ARTIFACT": "a/model.ptz", "LOG_PATH": "b/log.txt", "SUBMISSION_PATH": "c/sub.json",
           "SCORES_PATH": "d/scores.npy"}
    with pytest.raises(FileNotFoundError, match="no data shards match"):
        run_main(monkeypatch, tmp_path, tokenizer, empty_dir, **{k: str(tmp_path / v) for k, v in out.items()})
    assert all((tmp_path / v).parent.is_dir() for v in out.values())
    assert not (tmp_path / "b/log.txt").exists()  # the log opens only after the inputs passed


@pytest.mark.parametrize("var", ["ARTIFACT", "SUBMISSION_PATH", "SCORES_PATH", "LOG_PATH"])
def test_unwritable_output_fails_before_training(monkeypatch, tmp_path, tokenizer, data_dir, var):
    """An output under a regular file (a folder nobody can create, even root) stops the run at once,
    naming the variable: no step runs, nothing is written."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=rf"{var}=.*file/out.*cannot be written"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir, **{var: str(tmp_path / "file" / "out")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_full_disk_fails_before_training(monkeypatch, tmp_path, tokenizer, data_dir):
    """Less than 16 MB free where an output goes: refused before training, not after it."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match=r"LOG_PATH=.*cannot be written: less than 16000000 bytes free"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_or_keeps(tmp_path, monkeypatch):
    """atomic_write puts the whole new content under the name; when writing fails (here: the rename, as on
    a full disk) the earlier file is untouched and no temporary file is left behind."""
    path = tmp_path / "model.ptz"
    tg.atomic_write(str(path), b"first")
    tg.atomic_write(str(path), b"second")
    assert path.read_bytes() == b"second"

    def full_disk(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tg.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tg.atomic_write(str(path), b"third, never complete")
    assert path.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["model.ptz"]


# ----------------------------------------------------------------------------------------------
# input checks and the log
# ----------------------------------------------------------------------------------------------


def test_failed_input_check_keeps_earlier_log(monkeypatch, tmp_path, tokenizer, empty_dir):
    """A run that fails its input checks (here: no shards) leaves an earlier train_log.txt as it was."""
    earlier = "".join(f"line {i} of an earlier run\n" for i in range(38))
    (tmp_path / "train_log.txt").write_text(earlier)
    with pytest.raises(FileNotFoundError, match="no data shards match"):
        run_main(monkeypatch, tmp_path, tokenizer, empty_dir)
    assert (tmp_path / "train_log.txt").read_text() == earlier


def test_eval_only_refuses_a_training_log(monkeypatch, tmp_path, tokenizer, data_dir):
    """EVAL_ONLY with LOG_PATH at a training log refuses to run and leaves that log intact."""
    log = tmp_path / "train_log.txt"
    log.write_text("run_start 2026-01-01T00:00:00+00:00\ntrain_start warmup_steps 20\nstep 200 train_loss 2.1\n")
    before = log.read_text()
    with pytest.raises(ValueError, match="holds a training log"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir, EVAL_ONLY="1", LOG_PATH=str(log),
                 ARTIFACT=str(tmp_path / "model.ptz"))
    assert log.read_text() == before


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, tokenizer):
    """A tokenizer with as many pieces as `tokenizer`, trained otherwise (unigram on other documents)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_documents(3000, seed=7)), model_writer=model, model_type="unigram",
        vocab_size=tokenizer.vocab_size, byte_fallback=True, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("other_tokenizer") / "other_320.model"
    path.write_bytes(model.getvalue())
    return path


def test_tokenizer_of_other_shards_detected(tokenizer, other_tokenizer, data_dir):
    """Same vocabulary size, other tokenizer: the re-encoded validation documents differ, ValueError names
    both paths; the shards' own tokenizer passes."""
    tokens = np.asarray(tg.open_shard(str(data_dir / "fineweb_val_000000.bin")))
    tg.check_tokenizer_matches(tokenizer.sp, tokens, str(tokenizer.path), str(data_dir))
    other = spm.SentencePieceProcessor(model_file=str(other_tokenizer))
    assert other.vocab_size() == tokenizer.vocab_size
    with pytest.raises(ValueError, match=rf"shards in {data_dir} were not made with tokenizer {other_tokenizer}"):
        tg.check_tokenizer_matches(other, tokens, str(other_tokenizer), str(data_dir))


def test_script_with_other_tokenizer_stops_before_training(monkeypatch, tmp_path, tokenizer, other_tokenizer,
                                                            data_dir):
    """The run itself refuses the mismatched tokenizer before the log, the artifact or submission exist."""
    with pytest.raises(ValueError, match="were not made with tokenizer"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir, TOKENIZER_PATH=str(other_tokenizer))
    assert list(tmp_path.iterdir()) == []


def coded_artifact() -> bytes:
    """An artifact of the tiny model with two matrices as int6 codes (a rANS section of a few KB)."""
    state = tiny_model().state_dict()
    entries = tg.quantize_small_tensors(state)
    for name in ("tok_emb.weight", "blocks.0.mlp.fc.weight"):
        scale = tg.choose_row_scales(state[name].float(), tg.INT6_MAX)
        entries[name] = {"kind": "int6", "q": tg.quantize_rows(state[name].float(), scale, tg.INT6_MAX),
                         "scale": scale.half()}
    return tg.pack_artifact(tiny_config(), entries)


def corrupt_artifacts(tmp_path) -> dict:
    """Damaged copies of coded_artifact() -> {path: what unpack_artifact should name}."""
    blob = coded_artifact()
    at = len(tg.ARTIFACT_MAGIC) + 12  # the rANS words start here, the zstd frame after them
    end = at + 4 * int.from_bytes(blob[at - 12 : at - 4], "little")
    assert end - at > 1000  # the codes are there
    flipped = bytearray(blob)
    flipped[(at + end) // 2] ^= 4
    damaged = {"truncated.ptz": (blob[: (at + end) // 2], "rANS words: length or checksum"),
               "flipped.ptz": (bytes(flipped), "rANS words: length or checksum"),
               "truncated_frame.ptz": (blob[:-20], "zstd"),
               "noise.ptz": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "bad magic")}
    for name, (data, _) in damaged.items():
        (tmp_path / name).write_bytes(data)
    tg.unpack_artifact(blob)  # the undamaged one reads
    return {tmp_path / name: why for name, (_, why) in damaged.items()}


def test_corrupt_artifact_named(tmp_path):
    """A truncated, bit-flipped or random-bytes artifact raises ValueError naming the file and what is wrong."""
    for path, why in corrupt_artifacts(tmp_path).items():
        with pytest.raises(ValueError, match=rf"{path} is truncated or not a train_gpt.py artifact \({why}"):
            tg.load_artifact_model(str(path), torch.device("cpu"))


def test_artifact_decoded_with_other_models(monkeypatch):
    """A decoder whose Categorical tables differ from the encoder's (as another constriction version's quantization
    might) does not come back with wrong codes: the rANS stream does not end where the last code does."""
    blob, code_model = coded_artifact(), tg.code_model
    monkeypatch.setattr(tg, "code_model", lambda counts: code_model([n + 50 for n in counts]))
    with pytest.raises(ValueError, match=r"blob is truncated or not a train_gpt.py artifact \(rANS stream not at"):
        tg.unpack_artifact(blob)


def test_eval_only_corrupt_artifact_stops_before_log(monkeypatch, tmp_path, tokenizer, data_dir):
    path = next(iter(corrupt_artifacts(tmp_path)))
    with pytest.raises(ValueError, match=rf"{path} is truncated"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir, EVAL_ONLY="1", ARTIFACT=str(path))
    assert not (tmp_path / "eval_log.txt").exists()


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def test_misspelled_setting_warned(monkeypatch, tmp_path):
    """A variable close to a setting's name (NUM_LAYER) is reported in the log; settings themselves and
    unrelated variables are not."""
    monkeypatch.setenv("NUM_LAYER", "5")
    monkeypatch.setenv("MATRIX_LRS", "0.1")
    monkeypatch.setenv("NUM_LAYERS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    log = tg.Logger(str(tmp_path / "log.txt"), True)
    tg.log_run_header(log, tg.Hyperparameters(), {}, runtime(), b"", "dense=sdpa varlen=sdpa(mask)")
    warnings = [line for line in (tmp_path / "log.txt").read_text().splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING: MATRIX_LRS is not a setting and is ignored; did you mean MATRIX_LR?",
                        "WARNING: NUM_LAYER is not a setting and is ignored; did you mean NUM_LAYERS?"]


@torch.no_grad()
def test_num_loops_zero_ignores_loop_range():
    """NUM_LOOPS=0 ("off") with LOOP_START/LOOP_END left at 3/5 on a 2-layer model: valid, plain order, and
    the forward pass works."""
    args, _ = tg.Hyperparameters.from_env({"NUM_LOOPS": "0", "NUM_LAYERS": "2", "XSA_LAST_N": "2"})
    assert (args.loop_start, args.loop_end) == (3, 5)
    assert tg.layer_order(2, 0, 3, 5) == [0, 1]
    model = tiny_model(num_layers=2, num_loops=0, loop_start=3, loop_end=5)
    assert model.orders == {False: [0, 1], True: [0, 1]} and not model.looping
    assert model(torch.randint(3, 320, (1, 16))).shape == (1, 16, 320)


# ----------------------------------------------------------------------------------------------
# runs that train
# ----------------------------------------------------------------------------------------------


def test_divergence_stops_the_run(monkeypatch, tmp_path, tokenizer, data_dir):
    """Learning rates of 1e3: the first non-finite training loss (checked every LOG_EVERY steps) stops the
    run at that step with a clear error, logged as the run's end; no artifact, no submission.json."""
    with pytest.raises(FloatingPointError, match=r"train_loss nan at step \d+: training diverged"):
        run_main(monkeypatch, tmp_path, tokenizer, data_dir, ITERATIONS="20", LOG_EVERY="1", MATRIX_LR="1e3",
                 EMBED_LR="1e3", SCALAR_LR="1e3")
    lines = (tmp_path / "train_log.txt").read_text().splitlines()
    stopped = int(re.search(r"at step (\d+)", lines[-1]).group(1))
    assert lines[-1].startswith(f"run_end status=error FloatingPointError: train_loss nan at step {stopped}")
    assert 1 < stopped < 20 and lines[-2].startswith(f"step {stopped - 1} train_loss ")  # the last finite step
    assert not (tmp_path / "final_model.int6.ptz").exists() and not (tmp_path / "submission.json").exists()


def test_non_finite_weights_stop_the_run():
    """At the end of training the EMA weights are checked too: a last step that breaks them stops the run
    even though the loss it reported was finite."""
    assert tg.finite_loss(torch.tensor(2.5), 7, runtime(), [torch.ones(3)]) == 2.5
    with pytest.raises(FloatingPointError, match="train_loss 2.5 and nan/inf weights at step 7: training diverged"):
        tg.finite_loss(torch.tensor(2.5), 7, runtime(), [torch.ones(3), torch.tensor([1.0, math.inf])])


def test_over_time_limits_reported(monkeypatch, tmp_path, tokenizer, data_dir):
    """Training and evaluation past their limits (0.5 s with no GPTQ reserve; 1 ms): the log says OVER with
    the limits as set, submission.json (strict JSON, finite scores) says which limit was missed, exit 1."""
    status = run_main(monkeypatch, tmp_path, tokenizer, data_dir, MAX_WALLCLOCK_SECONDS="0.5",
                      GPTQ_RESERVE_SECONDS="0", EVAL_MAX_SECONDS="0.001", TTT_ENABLED="0")
    assert status == 1
    lines = (tmp_path / "train_log.txt").read_text().splitlines()
    assert any(line.startswith("gptq ") and line.endswith("(limit 0.5s OVER)") for line in lines)
    assert any(line.startswith("eval_seconds ") and line.endswith("(limit 0.001s OVER)") for line in lines)
    assert "ERROR: training took longer than MAX_WALLCLOCK_SECONDS=0.5s" in lines
    assert "ERROR: evaluation took longer than EVAL_MAX_SECONDS=0.001s" in lines
    assert lines[-1] == "run_end status=over_limit"
    sub = strict_json((tmp_path / "submission.json").read_text())
    assert sub["train_within_limit"] is False and sub["eval_within_limit"] is False
    assert math.isfinite(sub["val_bpb"]) and sub["train_seconds"] >= 0.5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_kill_during_evaluation(tmp_path, tokenizer, data_dir, sig):
    """A kill during evaluation, in a folder holding an earlier run's outputs: the earlier submission.json
    and scores are gone (removed once this run passed its checks), the new artifact is complete, the log
    ends with the kill, and the exit status is 128 + the signal number."""
    (tmp_path / "submission.json").write_text(json.dumps({"seed": 7, "val_bpb": 1.0}))
    np.save(tmp_path / "scores.npy", np.ones(3, dtype=np.float32))
    env = script_env(**{**TINY_ENV, "ITERATIONS": "2", "WARMUP_STEPS": "0", "TTT_LORA_CHUNK": "1",
                                    "TTT_LORA_DOCS": "1", "TTT_LORA_ROWS": "1"},  # one target per TTT step:
                     **tiny_model_env(tokenizer.vocab_size), DATA_PATH=str(data_dir),  # TTT until killed
                     TOKENIZER_PATH=str(tokenizer.path))
    proc = subprocess.Popen([sys.executable, str(TRAIN_GPT)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "train_log.txt", time.monotonic() + 240
    while not (log.exists() and "\nartifact written " in log.read_text()):  # evaluation time from here on
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig
    assert log.read_text().splitlines()[-1] == f"run_end status=killed signal={sig.name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.int6.ptz", "train_log.txt"]
    tg.load_artifact_model(str(tmp_path / "final_model.int6.ptz"), torch.device("cpu"))
