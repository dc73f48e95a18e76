"""Bad inputs fail early with a ValueError/FileNotFoundError whose message says what is wrong."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TRAIN_GPT, runtime, script_env, tg, write_shard


# ----------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------


def test_find_shards_no_match(tmp_path):
    """An empty glob raises FileNotFoundError naming the pattern and DATA_PATH."""
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(FileNotFoundError, match=r"no data shards match .*fineweb_train_\*\.bin.*DATA_PATH"):
        tg.find_shards(pattern)


def test_find_shards_sorted(tmp_path):
    """Matching files come back sorted by name."""
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", [1, 2, 3])
    files = tg.find_shards(str(tmp_path / "fineweb_train_*.bin"))
    assert [os.path.basename(f) for f in files] == [f"fineweb_train_00000{i}.bin" for i in range(3)]


def test_open_shard_roundtrip(tmp_path):
    """A well-formed shard reads back as exactly the uint16 tokens written (values above 2^15 included)."""
    tokens = np.array([1, 5, 65535, 40000, 0, 7], dtype=np.uint16)
    got = tg.open_shard(str(write_shard(tmp_path / "s.bin", tokens)))
    assert got.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(np.asarray(got), tokens)


def test_open_shard_bad_magic(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 2, 3], magic=12345)
    with pytest.raises(ValueError, match=r"magic/version 12345/1, expected 20240520/1"):
        tg.open_shard(str(path))


def test_open_shard_bad_version(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 2, 3], version=2)
    with pytest.raises(ValueError, match=r"magic/version 20240520/2, expected 20240520/1"):
        tg.open_shard(str(path))


@pytest.mark.parametrize("claimed", [4, 2])
def test_open_shard_size_mismatch(tmp_path, claimed):
    """Header token count larger (truncated file) or smaller (trailing bytes) than the payload."""
    path = write_shard(tmp_path / "s.bin", [1, 2, 3], num_tokens=claimed)
    with pytest.raises(ValueError, match=rf"header promises {claimed} tokens .*truncated or corrupt"):
        tg.open_shard(str(path))


def test_open_shard_short_header(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(np.array([tg.SHARD_MAGIC, 1, 0], dtype="<i4").tobytes())
    with pytest.raises(ValueError, match="shorter than the 1024-byte shard header"):
        tg.open_shard(str(path))


# ----------------------------------------------------------------------------------------------
# token ids
# ----------------------------------------------------------------------------------------------


def test_check_token_ids():
    """Ids < vocab pass; the largest offending id and VOCAB_SIZE appear in the message."""
    tg.check_token_ids(np.array([0, 5, 9], dtype=np.uint16), 10, "src")
    tg.check_token_ids(np.zeros(0, dtype=np.uint16), 10, "src")
    with pytest.raises(ValueError, match=r"src: token id 12 >= VOCAB_SIZE=10"):
        tg.check_token_ids(np.array([0, 10, 12, 3], dtype=np.uint16), 10, "src")


def test_load_validation_tokens_bad_id(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(200) % 50)
    with pytest.raises(ValueError, match=r"token id 49 >= VOCAB_SIZE=40"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16, 40)


def test_load_validation_tokens_too_short(tmp_path):
    """seq_len tokens are one target short of a sequence: ValueError."""
    write_shard(tmp_path / "fineweb_val_000000.bin", np.ones(16))
    with pytest.raises(ValueError, match=r"validation set has 16 tokens, fewer than TRAIN_SEQ_LEN\+1=17"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16, 40)


def test_load_validation_tokens_cut(tmp_path):
    """Shards are concatenated in name order and cut to n*seq_len + 1 tokens, as int64."""
    a, b = np.arange(0, 30), np.arange(30, 45)
    write_shard(tmp_path / "fineweb_val_000001.bin", b)
    write_shard(tmp_path / "fineweb_val_000000.bin", a)
    got = tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 8, 100)
    # 45 tokens -> 44 targets -> 5 sequences of 8 -> 41 tokens
    assert got.dtype == tg.torch.int64
    np.testing.assert_array_equal(got.numpy(), np.arange(41))


def test_token_loader_bad_id(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(500) % 64)
    with pytest.raises(ValueError, match=r"token id 63 >= VOCAB_SIZE=60"):
        tg.TokenLoader(str(tmp_path / "fineweb_train_*.bin"), 16, 2, runtime(), 0, 60)


def test_token_loader_too_little_data(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(40) % 10)
    with pytest.raises(ValueError, match="fewer than one batch of 17-token blocks"):
        tg.TokenLoader(str(tmp_path / "fineweb_train_*.bin"), 16, 4, runtime(), 0, 10)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def test_load_tokenizer_vocab_mismatch(tokenizer):
    n = tokenizer.vocab_size
    assert tg.load_tokenizer(str(tokenizer.path), n).vocab_size() == n
    with pytest.raises(ValueError, match=rf"has {n} pieces but VOCAB_SIZE=1024"):
        tg.load_tokenizer(str(tokenizer.path), 1024)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*nope\.model' not found; set TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "nope.model"), 1024)


# ----------------------------------------------------------------------------------------------
# hyperparameters
# ----------------------------------------------------------------------------------------------


def test_from_env_defaults_and_overrides():
    """Unset variables keep defaults; set ones are parsed to the field's type and echoed raw."""
    args, overrides = tg.Hyperparameters.from_env({"NUM_LAYERS": "12", "MATRIX_LR": "0.5", "TTT_ENABLED": "false",
                                                   "DATA_PATH": "/x", "UNRELATED": "1"})
    assert (args.num_layers, args.matrix_lr, args.ttt_enabled, args.data_path) == (12, 0.5, False, "/x")
    assert args.model_dim == tg.Hyperparameters().model_dim
    assert overrides == {"NUM_LAYERS": "12", "MATRIX_LR": "0.5", "TTT_ENABLED": "false", "DATA_PATH": "/x"}
    for raw, value in [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("No", False)]:
        assert tg.Hyperparameters.from_env({"EVAL_ONLY": raw})[0].eval_only is value


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "x"}, "NUM_LAYERS='x' is not a valid int"),
    ({"NUM_LAYERS": "2.5"}, "NUM_LAYERS='2.5' is not a valid int"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast' is not a valid float"),
    ({"TTT_ENABLED": "maybe"}, "TTT_ENABLED='maybe' is not a valid bool"),
])
def test_from_env_unparsable(env, message):
    with pytest.raises(ValueError, match=message):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, "MODEL_DIM must be divisible by NUM_HEADS"),
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, "NUM_HEADS must be divisible by NUM_KV_HEADS"),
    ({"MODEL_DIM": "24", "NUM_HEADS": "8"}, r"head dim \(MODEL_DIM/NUM_HEADS\) must be even"),
    ({"ROPE_DIMS": "128"}, "ROPE_DIMS must be even and at most the head dim"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS must be even"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N must be between 0 and NUM_LAYERS"),
    ({"NUM_LOOPS": "1", "LOOP_END": "10"}, r"LOOP_END < NUM_LAYERS - 1 \(the last block runs once\)"),
    ({"NUM_LOOPS": "1", "LOOP_START": "6", "LOOP_END": "5"}, "0 <= LOOP_START <= LOOP_END"),
    ({"NUM_LOOPS": "-1"}, "NUM_LOOPS must be >= 0"),
    ({"LOOP_FROM": "2"}, r"LOOP_FROM must be in \[0, 1\]"),
    ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS must be at least 2"),
    ({"EVAL_STRIDE": "48"}, "TRAIN_SEQ_LEN must be a multiple of EVAL_STRIDE"),
    ({"WARMDOWN_FRAC": "1.5"}, r"WARMDOWN_FRAC must be in \[0, 1\]"),
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS must be below MAX_WALLCLOCK_SECONDS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN"),
    ({"MATRIX_LR": "-1"}, r"MATRIX_LR must be >= 0, got -1\.0"),  # gradient ascent
    ({"EMBED_LR": "-0.1"}, "EMBED_LR must be >= 0"),
    ({"SCALAR_LR": "-0.1"}, "SCALAR_LR must be >= 0"),
    ({"TTT_LORA_LR": "-0.1"}, "TTT_LORA_LR must be >= 0"),
    ({"MLP_MULT": "0"}, r"MLP_MULT must be positive, got 0\.0"),
    ({"MLP_MULT": "-2"}, "MLP_MULT must be positive"),
    ({"GRAD_ACCUM_STEPS": "-1"}, "GRAD_ACCUM_STEPS must be >= 0, got -1"),
    ({"GPTQ_CALIB_BATCHES": "-1"}, "GPTQ_CALIB_BATCHES must be >= 0, got -1"),  # was silently "no GPTQ"
    ({"PARALLEL_START": "-1"}, r"PARALLEL_START must be >= 0 \(0: off\)"),
    ({"ATTN_GATE": "1", "MODEL_DIM": "8", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ROPE_DIMS": "4"},
     "ATTN_GATE needs MODEL_DIM >= 12"),
])
def test_from_env_inconsistent(env, message):
    with pytest.raises(ValueError, match=message):
        tg.Hyperparameters.from_env(env)


def test_grad_accum_steps_indivisible():
    """An explicit GRAD_ACCUM_STEPS that does not split the batch into whole sequences is refused."""
    args = tg.Hyperparameters(train_batch_tokens=4 * 64, train_seq_len=64, grad_accum_steps=3)
    with pytest.raises(ValueError, match="change GRAD_ACCUM_STEPS"):
        tg.grad_accum_steps(args, runtime())
    args = tg.Hyperparameters(train_batch_tokens=8 * 64, train_seq_len=64, micro_batch_tokens=128)
    assert tg.grad_accum_steps(args, runtime(0, 2)) == 2  # ceil(512 / (2 * 128))


@pytest.mark.parametrize("blob", [b"NOT-AN-ARTIFACT" + bytes(32), b"PGOLF-INT-2\n" + bytes(32),
                                  tg.zstandard.ZstdCompressor().compress(b"PGOLF-INT-2\n" + bytes(32)), b""])
def test_unpack_artifact_bad_magic(blob):
    """Other files, and artifacts of the previous format (zstd-22 of everything), are refused by their magic."""
    with pytest.raises(ValueError, match=r"art.ptz is truncated or not a train_gpt.py artifact \(bad magic\)"):
        tg.unpack_artifact(blob, "art.ptz")


# ----------------------------------------------------------------------------------------------
# the script itself
# ----------------------------------------------------------------------------------------------


def test_script_without_shards_exits_nonzero(tmp_path, tokenizer):
    """`python3 train_gpt.py` with DATA_PATH at an empty folder fails, explaining why on stderr."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = script_env(DATA_PATH=str(empty), TOKENIZER_PATH=str(tokenizer.path), VOCAB_SIZE=str(tokenizer.vocab_size))
    proc = subprocess.run([sys.executable, str(TRAIN_GPT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "no data shards match" in proc.stderr
    assert str(empty) in proc.stderr
    assert not (tmp_path / "submission.json").exists()
