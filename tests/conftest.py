"""Shared helpers and fixtures for the train_gpt.py test suite.

Everything here is self-contained: a tiny SentencePiece tokenizer is trained on generated
English-like text, and challenge-format shards are written from it into temporary folders.
Only tests/test_real_data.py reads the shared stand-in corpus (REPO_ROOT/../shared/data).
"""
from __future__ import annotations

import io
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402

TRAIN_GPT = REPO_ROOT / "train_gpt.py"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CPU = torch.device("cpu")
BOS = 1

# ----------------------------------------------------------------------------------------------
# text, tokenizer, shards
# ----------------------------------------------------------------------------------------------

WORDS = """the of and to in a is that for it as was with be by on not he i this are or his from at which
but have an they you were her she there been one all we their has would when if so no what can out
other about into more some time could them only then new like these two may first also any after
over well where most people through just years because before good world between very water great
house small little light river city music game golf garden morning evening story letter window
running quickly slowly bright quiet strange simple ancient modern market school friend family""".split()
# Rare strings: digits and non-ASCII characters fall outside the character coverage of a
# 320-piece vocabulary, so they are encoded with byte-fallback tokens (multi-byte UTF-8 included).
RARE = ["42", "1999", "x7", "café", "naïve", "über", "jalapeño", "€5", "日本", "🙂", "—", "’s"]

# Pieces forced into the tiny vocabulary so byte rules can be checked by hand.
USER_SYMBOLS = ["\u2581golf", "café"]


def make_documents(n_docs: int, seed: int = 0, rare_prob: float = 0.004) -> list[str]:
    """Deterministic English-like documents of 1-4 lowercase sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(RARE) if rng.random() < rare_prob else rng.choice(WORDS)
                     for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words) + rng.choice([".", ".", "!", "?", ","]))
        docs.append(" ".join(sentences))
    return docs


@dataclass
class Tokenizer:
    path: Path
    sp: spm.SentencePieceProcessor

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """Token stream of the documents, each prefixed by BOS (id 1), as uint16."""
    out: list[int] = []
    for ids in sp.encode(docs):
        out.append(BOS)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def write_shard(path, tokens, *, magic: int = tg.SHARD_MAGIC, version: int = tg.SHARD_VERSION,
                num_tokens: int | None = None) -> Path:
    """Write a challenge shard: 256 little-endian int32 header [magic, version, n, 0...] + uint16 tokens."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = tokens.size if num_tokens is None else num_tokens
    path = Path(path)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return path


def docs_tokens(sp: spm.SentencePieceProcessor, n_tokens: int, seed: int) -> np.ndarray:
    """At least n_tokens tokens of BOS-separated generated documents, cut to exactly n_tokens."""
    docs, toks = [], np.zeros(0, dtype=np.uint16)
    batch = max(8, n_tokens // 40)
    while toks.size < n_tokens:
        docs += make_documents(batch, seed=seed * 1000 + len(docs))
        toks = encode_documents(sp, docs)
    return toks[:n_tokens]


# ----------------------------------------------------------------------------------------------
# tiny model
# ----------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int = 320, **overrides) -> dict:
    """GPT(**config) arguments: every key of tg.MODEL_FIELDS plus max_seq_len and bos_id."""
    config = dict(vocab_size=vocab_size, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                  rope_dims=8, rope_base=10000.0, qk_gain_init=1.5, xsa_last_n=2, bigram_buckets=64, bigram_dim=16,
                  logit_softcap=30.0, tied_embed_init_std=0.005, num_loops=0, loop_start=0, loop_end=0,
                  doc_mask=False, parallel_start=1, skip_gates=True, attn_gate=True, max_seq_len=64, bos_id=BOS)
    config.update(overrides)
    assert set(config) == set(tg.MODEL_FIELDS) | {"max_seq_len", "bos_id"}
    return config


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised branches (residual projections,
    bigram table, smear gate) are live and the tests can see what they do."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model_env(vocab_size: int, **overrides) -> dict[str, str]:
    """Environment variables that give train_gpt.py the tiny_config() model shape."""
    config = tiny_config(vocab_size, **overrides)
    return {k.upper(): str(config[k]) for k in tg.MODEL_FIELDS}


def tiny_model(seed: int = 0, std: float = 0.05, **overrides) -> tg.GPT:
    """A perturbed tiny GPT in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    model = tg.GPT(**tiny_config(**overrides))
    return perturb(model, seed + 1, std).eval()


# A few seconds of training and evaluation on CPU with the tiny model (plus tiny_model_env()).
TINY_ENV = dict(
    TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024",
    MICRO_BATCH_TOKENS="1024", ITERATIONS="20", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="60",
    GPTQ_RESERVE_SECONDS="1", GPTQ_CALIB_BATCHES="2", EVAL_STRIDE="32", EVAL_BATCH_SEQS="8",
    TTT_LORA_CHUNK="16", TTT_LORA_DOCS="4", TTT_LORA_ROWS="4", EMA_DECAY="0.9", SCORES_PATH="scores.npy",
)


def script_env(**overrides: str) -> dict[str, str]:
    """Environment for running train_gpt.py as a subprocess: the current one without any
    hyperparameter or torchrun variables (so the caller's shell cannot leak in), plus overrides."""
    drop = {f.name.upper() for f in tg.fields(tg.Hyperparameters)} | {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides)
    return env


def runtime(rank: int = 0, world_size: int = 1) -> tg.Runtime:
    return tg.Runtime(rank, world_size, 0, CPU)


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A 320-piece BPE SentencePiece model with byte fallback (unk=0, bos=1, eos=2)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_documents(3000, seed=1)), model_writer=model, model_type="bpe",
        vocab_size=320, byte_fallback=True, user_defined_symbols=USER_SYMBOLS, num_threads=1, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tiny_320_bpe.model"
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    return Tokenizer(path, sp)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer) -> Path:
    """DATA_PATH folder with two train shards and one val shard made with the tiny tokenizer."""
    d = tmp_path_factory.mktemp("data")
    write_shard(d / "fineweb_train_000000.bin", docs_tokens(tokenizer.sp, 12_000, seed=11))
    write_shard(d / "fineweb_train_000001.bin", docs_tokens(tokenizer.sp, 9_000, seed=12))
    write_shard(d / "fineweb_val_000000.bin", docs_tokens(tokenizer.sp, 1_300, seed=13))
    return d
