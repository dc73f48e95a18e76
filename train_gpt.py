"""Parameter Golf entry: a 16 MB language model trained in 10 minutes, scored in bits per byte.

    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the contest run (defaults)
    python3 train_gpt.py                                          # one process; CPU works with a tiny config

Every hyperparameter is an environment variable named like its field in `Hyperparameters`. The file reads top to
bottom in pipeline order, in nine sections (banners `# ---- N.`): hyperparameters, runtime and logging, data, bpb, model
and optimizers, training, quantization, evaluation, main. README.md explains each technique and where it comes from."""
from __future__ import annotations

import contextlib
import datetime
import difflib
import glob
import hashlib
import importlib.metadata
import inspect
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

# NVLink multicast (NVLS) stays off: it can take a shared host's GPUs out of service.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# oneDNN's AMX bf16 kernels die with SIGILL on virtual machines that advertise AMX without enabling it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import constriction
import numpy as np
import sentencepiece as spm
import torch
import torch._inductor.config
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import zstandard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

SUBMISSION_NAME = "GQA U-Net + BigramHash + SmearGate, Muon/EMA, GPTQ int6 + rANS, score-first TTT"
ARTIFACT_LIMIT_BYTES = 16_000_000

# ---- 1. Hyperparameters ----------------------------------------------------------------------

BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}
ENV_PARSERS = {"int": int, "float": float, "str": str, "bool": lambda raw: BOOL_WORDS[raw.strip().lower()]}


@dataclass
class Hyperparameters:
    """Every knob of the run; field `foo_bar` is set by environment variable `FOO_BAR` (booleans: 1/0/true/false).
    Defaults are the contest run (8 GPUs x 600 s). Raises ValueError for unparsable or inconsistent values."""

    # data, tokenizer, outputs
    data_path: str = "./data/datasets/fineweb10B_sp8192"
    tokenizer_path: str = "./data/tokenizers/fineweb_8192_bpe.model"
    vocab_size: int = 8192  # P300 seed 1337: 1.2712 after TTT against 1.2767 (3-seed mean) with sp1024
    seed: int = 1337
    artifact: str = "final_model.int6.ptz"  # written after training; read back for every score
    log_path: str = ""  # "" -> train_log.txt (eval_log.txt with EVAL_ONLY)
    submission_path: str = "submission.json"
    scores_path: str = ""  # .npy of per-token NLL (nats, float32) of the final scored pass
    eval_only: bool = False  # skip training, evaluate ARTIFACT
    attention: str = "auto"  # auto | flash | sdpa: FlashAttention where it measured faster, always, never
    # model
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    rope_dims: int = 16  # partial RoPE: rotary on the first 16 of 64 head dims
    rope_base: float = 10000.0
    qk_gain_init: float = 5.0  # R6-R8
    xsa_last_n: int = 11  # exclusive self-attention on the last N layers
    doc_mask: bool = True  # no attention across a BOS, in training and in every evaluation pass (R6-R8)
    parallel_start: int = 7  # decoder blocks from this index on run attention and MLP in two lanes (R7; 0: off)
    skip_gates: bool = True  # U-Net skips blended in by learned sigmoid gates (R7) instead of added
    attn_gate: bool = True  # per-head attention output gate 2*sigmoid(W x[:12]) (R6)
    num_loops: int = 1  # depth recurrence: extra passes through blocks LOOP_START..LOOP_END (0: none)
    loop_start: int = 3
    loop_end: int = 5
    loop_from: float = 0.35  # fraction of the training budget after which the extra passes run
    bigram_buckets: int = 3072
    bigram_dim: int = 112
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    # training
    train_batch_tokens: int = 786_432  # global tokens per optimizer step
    train_seq_len: int = 2048
    micro_batch_tokens: int = 98_304  # per-GPU tokens per forward; sets automatic accumulation
    grad_accum_steps: int = 0  # 0: ceil(train_batch_tokens / (world_size * micro_batch_tokens))
    iterations: int = 20_000  # step cap; the wall clock normally stops training first
    max_wallclock_seconds: float = 600.0  # training budget, GPTQ calibration included
    warmdown_frac: float = 0.75  # final fraction of the budget over which the LR decays to 0
    warmup_steps: int = 20  # compile-priming steps on random tokens; state is reset after them
    matrix_lr: float = 0.026  # Muon (R8)
    embed_lr: float = 0.035  # Adam: tied embedding, bigram table
    scalar_lr: float = 0.025  # Adam: gains, mixes, skip weights
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.095
    muon_row_normalize: bool = True  # MuonEq-R: each row of the update scaled to unit norm before NS
    adam_wd: float = 0.085  # R8
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3  # 0 disables
    ema_decay: float = 0.9965
    log_every: int = 200
    # quantization
    gptq_calib_batches: int = 16  # per-GPU training micro-batches for GPTQ Hessians (0: no GPTQ)
    gptq_reserve_seconds: float = 8.0  # carved from the training budget for GPTQ (3.8 s measured on P300)
    # evaluation
    eval_stride: int = 64
    eval_batch_seqs: int = 32  # windows per forward, per GPU
    eval_max_seconds: float = 600.0  # everything after training; TTT degrades to scoring past it
    ttt_enabled: bool = True  # per-document LoRA TTT (R6/R7); 0: the plain sliding pass is the final score
    ttt_lora_rank: int = 32
    ttt_lora_lr: float = 3e-4  # Adam with beta1 0, beta2 0.999 (R6/R7), one state per document
    ttt_lora_chunk: int = 64  # targets of a document scored, then trained on, per step
    ttt_lora_rows: int = 32  # batch rows of TRAIN_SEQ_LEN tokens a step, documents' windows packed into them
    ttt_lora_docs: int = 96  # most documents in flight (each one adapter and one window a step)

    @classmethod
    def from_env(cls, environ=os.environ) -> tuple["Hyperparameters", dict[str, str]]:
        """Build from the environment; returns (hyperparameters, {VAR: raw value} of overrides)."""
        kwargs, overrides = {}, {}
        for f in fields(cls):
            if (raw := environ.get(var := f.name.upper())) is not None:
                try:
                    kwargs[f.name], overrides[var] = ENV_PARSERS[f.type](raw), raw
                except (KeyError, ValueError):
                    raise ValueError(f"{var}={raw!r} is not a valid {f.type}") from None
        args = cls(**kwargs)
        args.validate()
        return args, overrides

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        positive = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                    "train_batch_tokens", "train_seq_len", "micro_batch_tokens", "eval_stride", "eval_batch_seqs",
                    "log_every", "iterations", "ttt_lora_rank", "ttt_lora_chunk", "ttt_lora_docs",
                    "ttt_lora_rows")
        for name in positive + ("matrix_lr", "embed_lr", "scalar_lr", "muon_wd", "adam_wd", "grad_clip_norm",
                                "grad_accum_steps", "gptq_calib_batches", "warmup_steps", "ttt_lora_lr"):
            value = getattr(self, name)
            if value < 0 or (value == 0 and name in positive):
                raise ValueError(f"{name.upper()} must be {'positive' if name in positive else '>= 0'}, got {value}")
        checks = [
            (self.model_dim % self.num_heads == 0, "MODEL_DIM must be divisible by NUM_HEADS"),
            (self.num_heads % self.num_kv_heads == 0, "NUM_HEADS must be divisible by NUM_KV_HEADS"),
            ((self.model_dim // self.num_heads) % 2 == 0, "head dim (MODEL_DIM/NUM_HEADS) must be even"),
            (0 < self.rope_dims <= self.model_dim // self.num_heads and self.rope_dims % 2 == 0,
             "ROPE_DIMS must be even and at most the head dim"),
            (0 <= self.xsa_last_n <= self.num_layers, "XSA_LAST_N must be between 0 and NUM_LAYERS"),
            (self.num_loops == 0 or 0 < self.num_loops and 0 <= self.loop_start <= self.loop_end < self.num_layers - 1,
             "NUM_LOOPS must be >= 0; with NUM_LOOPS > 0, 0 <= LOOP_START <= LOOP_END < NUM_LAYERS - 1 "
             "(the last block runs once)"),
            (0.0 <= self.loop_from <= 1.0, "LOOP_FROM must be in [0, 1]"),
            (self.parallel_start >= 0, "PARALLEL_START must be >= 0 (0: off)"),
            (self.attention in ("auto", "flash", "sdpa"), f"ATTENTION must be auto, flash or sdpa: {self.attention!r}"),
            (not self.attn_gate or self.model_dim >= GATE_INPUTS, f"ATTN_GATE needs MODEL_DIM >= {GATE_INPUTS}"),
            (self.bigram_buckets >= 2, "BIGRAM_BUCKETS must be at least 2"),
            (self.train_seq_len % self.eval_stride == 0, "TRAIN_SEQ_LEN must be a multiple of EVAL_STRIDE"),
            (0.0 <= self.warmdown_frac <= 1.0, "WARMDOWN_FRAC must be in [0, 1]"),
            (0.0 <= self.gptq_reserve_seconds < self.max_wallclock_seconds,
             "GPTQ_RESERVE_SECONDS must be below MAX_WALLCLOCK_SECONDS"),
            (self.train_batch_tokens % self.train_seq_len == 0,
             "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---- 2. Runtime and logging ------------------------------------------------------------------

@dataclass
class Runtime:
    """Where this process runs: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    is_main = property(lambda self: self.rank == 0)
    distributed = property(lambda self: self.world_size > 1)  # several processes (torchrun)


def init_runtime() -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick cuda:LOCAL_RANK (or CPU), join the group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # Inductor's mix-order reduction made 5 ms RMSNorm-backward kernels (H200 P300 step 92.4 -> 81.1 ms without)
        torch._inductor.config.triton.mix_order_reduction = False
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device)


def all_reduce(t: torch.Tensor, rt: Runtime, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce across ranks; a no-op in a single process."""
    if rt.distributed:
        dist.all_reduce(t, op=op)
    return t


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast with SDPA preferring cuDNN, then flash kernels (cuDNN measured fastest) on GPU; fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION], set_priority=True))
    return stack


def maybe_compile(module, device: torch.device):
    """torch.compile on GPU (static shapes); eager on CPU."""
    return torch.compile(module, dynamic=False) if device.type == "cuda" else module


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, device: torch.device):
    """Regional compilation (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): inside the context
    each Block's `attend` and `feed` run compiled (maybe_compile), the rest of the forward eager; all blocks share one
    compiled code (parameters and buffers are graph inputs). bench/lora_compile.py compares whole-model compiling."""
    for block in model.blocks:
        block.attend, block.feed = maybe_compile(block.attend, device), maybe_compile(block.feed, device)
    try:
        yield model
    finally:
        for block in model.blocks:
            del block.attend, block.feed


class Logger:
    """Prints on rank 0 and appends every line to the log file (truncated when made: after main()'s input checks)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            open(path, "w", encoding="utf-8").close()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace, so no crash leaves it truncated. Raises OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def interrupt_on_signal(signum: int, _frame) -> None:
    """SIGTERM/SIGINT handler: raise KeyboardInterrupt(signal name), which main() logs as the run's end."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def log_run_header(log: Logger, args: Hyperparameters, overrides: dict, rt: Runtime, code: bytes, attention: str):
    log(f"run_start {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    log(f"code_sha256 {hashlib.sha256(code).hexdigest()} code_bytes {len(code)}")
    log(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} numpy {np.__version__}"
        f" zstandard {zstandard.__version__} constriction {importlib.metadata.version('constriction')}")
    if rt.device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        log(f"gpus {len(names)}: {', '.join(names)}")
    log(f"world_size {rt.world_size} device {rt.device} attention {attention}")
    log("env_overrides " + (" ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "(none)"))
    log("hyperparameters " + json.dumps(asdict(args), sort_keys=True))
    names = [f.name.upper() for f in fields(Hyperparameters)]
    for var in sorted(k for k in os.environ if k.isupper() and k not in names):  # a misspelled setting is ignored
        for name in difflib.get_close_matches(var, names, 1, 0.85):
            log(f"WARNING: {var} is not a setting and is ignored; did you mean {name}?")


# ---- 3. Data: challenge shards (256 x int32 header, then uint16 tokens) ----------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS, SHARD_HEADER_BYTES = 20240520, 1, 256, 1024  # 256 int32


def find_shards(pattern: str) -> list[str]:
    """Sorted files matching `pattern`; FileNotFoundError naming the fix when there are none."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no data shards match {pattern!r}. Set DATA_PATH to the folder holding "
                                "fineweb_train_*.bin and fineweb_val_*.bin (README: 'Data').")
    return files


def open_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens (uint16, read-only); ValueError on a short header, wrong magic/version or size."""
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS:
        raise ValueError(f"{path}: shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        raise ValueError(f"{path}: header magic/version {int(header[0])}/{int(header[1])}, expected "
                         f"{SHARD_MAGIC}/{SHARD_VERSION}: not a challenge shard; re-create it with the data script")
    expected = SHARD_HEADER_BYTES + 2 * (num_tokens := int(header[2]))
    if (actual := os.path.getsize(path)) != expected:
        raise ValueError(f"{path}: {actual} bytes, but its header promises {num_tokens} tokens ({expected} bytes): "
                         "truncated or corrupt; download it again")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """ValueError if any token id is >= vocab_size (shards from another tokenizer)."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{source}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}: these shards were made "
                         "with another tokenizer; point DATA_PATH/TOKENIZER_PATH/VOCAB_SIZE at matching files")


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int) -> torch.Tensor:
    """All validation shards concatenated, cut to a multiple of seq_len plus one token (challenge rule).
    Returns int64 tensor of shape (n * seq_len + 1,). Raises ValueError if shorter than one sequence."""
    tokens = np.concatenate([np.asarray(open_shard(f)) for f in find_shards(pattern)])
    check_token_ids(tokens, vocab_size, pattern)
    if (usable := ((tokens.size - 1) // seq_len) * seq_len) <= 0:
        raise ValueError(f"validation set has {tokens.size} tokens, fewer than TRAIN_SEQ_LEN+1={seq_len + 1}; "
                         "use the full val shard or a shorter TRAIN_SEQ_LEN")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


class TokenLoader:
    """Training batches of (seq_len+1)-token blocks, identical for any world size (README: How it works, Data): each
    epoch cuts the memory-mapped shards at a random phase and permutes the blocks (seed, epoch); rank r reads its slice
    of a step's blocks. Raises like `open_shard` and `check_token_ids`, or ValueError if the shards hold < a step."""

    def __init__(self, pattern: str, seq_len: int, seqs_per_rank: int, rt: Runtime, seed: int, vocab_size: int):
        files = find_shards(pattern)
        self.shards = [open_shard(f) for f in files]
        for path, shard in zip(files, self.shards):  # on every rank, so a bad shard stops all of them
            check_token_ids(shard, vocab_size, path)
        self.seq_len, self.seqs_per_rank, self.rt, self.seed = seq_len, seqs_per_rank, rt, seed
        self.epoch, self.cursor, self.order = -1, 0, np.zeros(0, dtype=np.int64)
        self._new_epoch()
        if self.order.size < seqs_per_rank * rt.world_size:
            raise ValueError(f"training shards hold fewer than one batch of {seq_len + 1}-token blocks")

    def _new_epoch(self) -> None:
        self.epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        self.phase = int(rng.integers(self.seq_len)) if self.epoch > 0 else 0
        counts = [max(0, (len(s) - 1 - self.phase) // self.seq_len) for s in self.shards]
        self.block_offsets = np.cumsum([0] + counts)
        self.order, self.cursor = rng.permutation(int(self.block_offsets[-1])), 0

    def _block(self, block_id: int) -> np.ndarray:
        shard = int(np.searchsorted(self.block_offsets, block_id, side="right")) - 1
        start = self.phase + (block_id - int(self.block_offsets[shard])) * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 of shape (seqs_per_rank, seq_len), on this rank's device."""
        step_blocks = self.seqs_per_rank * self.rt.world_size
        if self.cursor + step_blocks > self.order.size:
            self._new_epoch()
        ids = self.order[self.cursor : self.cursor + step_blocks]
        self.cursor += step_blocks
        mine = ids[self.rt.rank * self.seqs_per_rank : (self.rt.rank + 1) * self.seqs_per_rank]
        batch = torch.from_numpy(np.stack([self._block(int(b)) for b in mine]).astype(np.int64))
        if self.rt.device.type == "cuda":
            batch = batch.pin_memory().to(self.rt.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


# ---- 4. bpb accounting (exactly the challenge's byte rule) -----------------------------------

def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model; ValueError if its vocabulary size is not VOCAB_SIZE."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} not found; set TOKENIZER_PATH (README: 'Data')")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; "
                         "set VOCAB_SIZE to match, or use the tokenizer the shards were made with")
    return sp


def check_tokenizer_matches(sp: spm.SentencePieceProcessor, tokens: np.ndarray, tokenizer_path: str, data_path: str):
    """ValueError if `sp` re-encodes the decoded text of the first 200 complete documents (BOS to next BOS) of `tokens`
    into other ids for more than a tenth of them: shards of another tokenizer of the same vocabulary size (a wrong bpb)
    differ in nearly every document, a rare decode/encode quirk passes (0 of 7,680 stand-in documents differ)."""
    bos = np.flatnonzero(tokens == sp.bos_id())[:201]
    docs = [tokens[a + 1 : b].tolist() for a, b in zip(bos[:-1], bos[1:])]
    differ = sum(again != ids for again, ids in zip(sp.encode(sp.decode(docs)), docs))
    if differ > len(docs) // 10:
        raise ValueError(f"the shards in {data_path} were not made with tokenizer {tokenizer_path}: {differ} of "
                         f"{len(docs)} documents re-encode to other ids; set TOKENIZER_PATH to the shards' tokenizer")


def byte_tables(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The challenge's byte rule per token id -> (base_bytes int64, has_leading_space bool, is_boundary bool): control,
    unknown and unused tokens are 0-byte boundaries, byte-fallback tokens 1 byte, other pieces their UTF-8 bytes without
    the leading "▁", which adds one byte unless the previous token is a boundary (none right after BOS)."""
    n = sp.vocab_size()
    base, space, boundary = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return base, space, boundary


def target_bytes(tokens: torch.Tensor, tables: tuple[np.ndarray, np.ndarray, np.ndarray]) -> torch.Tensor:
    """Bytes credited to each target: tokens (N+1,) -> int64 (N,), target j = tokens[j+1] after tokens[j]."""
    base, space, boundary = (torch.from_numpy(t) for t in tables)
    prev, tgt = tokens[:-1].cpu(), tokens[1:].cpu()
    return base[tgt] + (space[tgt] & ~boundary[prev]).long()


def bits_per_byte(nll_sum_nats: float, n_bytes: int) -> float:
    """bpb = total NLL in bits over total bytes (= mean loss / ln 2 * tokens / bytes)."""
    return nll_sum_nats / math.log(2.0) / n_bytes


# ---- 5. Model and optimizers -----------------------------------------------------------------

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def doc_segments(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Segments for masked attention: input_ids (B, T) -> cu_seqlens int32 (S+1,), the flat offsets of every row start
    and BOS, then B*T; eager and marked dynamic (data-dependent length), so one compiled graph serves every batch."""
    starts = input_ids == bos_id
    starts[:, 0] = True
    cu = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=input_ids.numel()).to(torch.int32)
    torch._dynamo.mark_dynamic(cu, 0)
    return cu


try:  # FlashAttention-2 variable-length kernel inside PyTorch (seen in 2.11 and 2.13, whose keywords differ)
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_ARGS = inspect.signature(varlen_attn).parameters
    _VARLEN_KW = {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}
    _VARLEN_KW |= {"enable_gqa": True} if "enable_gqa" in _VARLEN_ARGS else {}
except ImportError:
    varlen_attn = None

FLASH_FASTER = {"H100": {"dense", "varlen"}, "H200": {"dense", "varlen"}}  # GPU name -> modes measured faster (README)
ATTENTION_ROUTES = {"dense": None, "varlen": None}  # FlashAttention's call per mode, None: PyTorch's (select_attention)
GATE_INPUTS = 12  # leading residual channels that drive the attention output gate (R6)


@torch.library.custom_op("train_gpt::flash4", mutates_args=())
def flash4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor | None, t: int, y: torch.Tensor | None,
           lse: torch.Tensor | None, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """FA4's kernels as one op (`flash_attn.cute` registers none for torch.compile). q: (B, T, H, D), or (N, H, D) with
    cu_seqlens cu, lengths <= t; k, v: Hkv heads -> causal [y, fp32 lse (B, H, T) or (H, N)]; with grad [dq, dk, dv]."""
    fa, kw = importlib.import_module("flash_attn.cute.interface"), dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    kw |= dict(max_seqlen_q=t, max_seqlen_k=t)
    return list(fa._flash_attn_bwd(q, k, v, y, grad, lse, **kw) if grad is not None else
                fa._flash_attn_fwd(q, k, v, return_lse=True, **kw)[:2])


flash4.register_fake(lambda q, k, v, cu, t, y, lse, grad: [x.new_empty(x.shape) for x in (q, k, v)] if grad is not None
                     else [q.new_empty(q.shape), q.new_empty(*q.shape[:-3], q.size(-2), q.size(-3)).float()])
flash4.register_autograd(  # the backward is flash4 again, on the saved q, k, v, cu, t, y, lse and the gradient of y
    lambda ctx, grads: (*flash4(*ctx.saved_tensors[:4], ctx.t, *ctx.saved_tensors[4:], grads[0]), *[None] * 5),
    setup_context=lambda ctx, inputs, output: (ctx.save_for_backward(*inputs[:4], *output),
                                               setattr(ctx, "t", inputs[4])))


def select_attention(args: Hyperparameters, device: torch.device) -> str:
    """Route `causal_attention` once, before compiling; returns the routes for the log. auto: FA4 (`flash4`) in the
    modes FLASH_FASTER names for this GPU if its forward and backward run at the model's shapes (JIT-compiling them),
    else PyTorch, reason logged; flash: both modes or RuntimeError; sdpa: PyTorch. FA3 has no pip build: not routed."""
    cuda, note = device.type == "cuda", ""
    routes = {"dense": "sdpa", "varlen": "torch varlen_attn" if cuda and varlen_attn else "sdpa(mask)"}
    modes = {"flash": set(routes), "sdpa": set()}.get(args.attention, next(
        (m for gpu, m in FLASH_FASTER.items() if cuda and gpu in torch.cuda.get_device_name(device)), set()))
    ATTENTION_ROUTES.update(dense=None, varlen=None)
    try:
        if modes:
            importlib.import_module("flash_attn.cute.interface")
            name = f"flash-attn-4 {importlib.metadata.version('flash-attn-4')}"
            ATTENTION_ROUTES.update(dict.fromkeys(modes, lambda q, k, v, cu, t: flash4(q, k, v, cu, t, *[None] * 3)[0]))
            t, d = args.train_seq_len, args.model_dim // args.num_heads  # the smoke call: dense, 1 and t/4 segments
            q, k, v = (torch.randn(1, t, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for h in (args.num_heads, args.num_kv_heads, args.num_kv_heads))
            for cu in (None, *(torch.tensor([*range(0, t, n), t], dtype=torch.int32, device=device) for n in (t, 4))):
                causal_attention(q, k, v, cu).float().sum().backward()
    except Exception as e:
        ATTENTION_ROUTES.update(dense=None, varlen=None)
        if args.attention == "flash":
            raise RuntimeError(f"ATTENTION=flash, but FlashAttention does not work here ({type(e).__name__}: {e}); it "
                               "needs a CUDA GPU and `pip install -r requirements-gpu.txt` (or ATTENTION=sdpa)") from e
        modes, note = set(), f" (FlashAttention not used: {type(e).__name__}: {e})"
    return " ".join(f"{m}={name if m in modes else r}" for m, r in routes.items()) + note


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention: q (B, T, H, D), k, v (B, T, Hkv, D), H % Hkv == 0 -> (B, T, H, D); with cu_seqlens
    (`doc_segments`) no token attends across a segment start. FlashAttention where `select_attention` routed it (q, k
    cast to v's dtype), else SDPA; with cu_seqlens PyTorch's varlen FlashAttention-2 on GPU, a block mask on CPU."""
    b, t = q.shape[:2]
    if flash := ATTENTION_ROUTES["dense" if cu_seqlens is None else "varlen"]:  # varlen in FA's layout: (B*T, H, D)
        qkv = [x.to(v.dtype) if cu_seqlens is None else x.to(v.dtype).flatten(0, 1) for x in (q, k, v)]
        return flash(*qkv, cu_seqlens, t).view_as(q)
    if cu_seqlens is not None and q.is_cuda and varlen_attn is not None:
        y = varlen_attn(*(x.flatten(0, 1) for x in (q, k, v)), cu_seqlens, cu_seqlens, t, t, **_VARLEN_KW)
        return y.view_as(q)
    mask = None
    if cu_seqlens is not None:  # segment id of each token: attend causally within it
        seg = torch.zeros(b * t, dtype=torch.int32, device=q.device).index_fill_(0, cu_seqlens[1:-1].long(), 1)
        seg = seg.cumsum(0).view(b, 1, t)
        mask = (seg.unsqueeze(-1) == seg.unsqueeze(-2)) & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=True)
    return y.transpose(1, 2)


@torch.library.custom_op("train_gpt::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Gradient of an embedding table: rows of `grad` summed by id -> (num_rows, dim). Opaque to torch.compile, so
    PyTorch's sort-based kernel runs, not Inductor's atomic adds (5 ms per table per step on an H200: frequent ids)."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_rows, -1, False)


embedding_backward.register_fake(lambda grad, ids, num_rows: grad.new_empty(num_rows, grad.size(-1)))


class Embedding(nn.Embedding):
    """nn.Embedding whose backward is `embedding_backward`. ids (...) int64 -> (..., dim)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _EmbeddingFunction.apply(self.weight, ids)


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids):
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.size(0)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        return embedding_backward(grad.contiguous(), ctx.saved_tensors[0], ctx.num_rows), None


class Rotary(nn.Module):
    """RoPE (Su et al. 2021) on the first `rope_dims` dims of each head only (partial RoPE: 2026-03-21 record)."""

    def __init__(self, rope_dims: int, base: float, max_len: int):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.rope_dims = rope_dims
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, D) -> same shape; T must not exceed max_len."""
        t, half = x.size(1), self.rope_dims // 2
        cos, sin = self.cos[:, :t].to(x.dtype), self.sin[:, :t].to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half : self.rope_dims], x[..., self.rope_dims :]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (2026-03-20_11L_XSA4, PR #1019): y (B, T, H, D) less its part on each token's own value v (B, T, Hkv, D)."""
    b, t, h, d = y.shape
    groups = y.reshape(b, t, v.size(2), h // v.size(2), d)
    v_unit = F.normalize(v, dim=-1).unsqueeze(3)
    return (groups - (groups * v_unit).sum(-1, keepdim=True) * v_unit).reshape(b, t, h, d)


class CausalSelfAttention(nn.Module):
    """GQA attention with RMS-normed q/k, a learned per-head query gain, partial RoPE, optional XSA and
    an optional per-head output gate y_h *= 2 sigmoid(w_h . x[:12]) (R6; w zero-initialised, so 1 at start)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rotary: Rotary, qk_gain_init: float, xsa: bool,
                 gate: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k, self.c_v = (nn.Linear(dim, num_kv_heads * self.head_dim, bias=False) for _ in "kv")
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.gate = nn.Parameter(torch.zeros(num_heads, GATE_INPUTS)) if gate else None
        self.rotary, self.xsa = rotary, xsa

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim); cu_seqlens as in `causal_attention`."""
        b, t, dim = x.shape
        q = self.rotary(rms_norm(self.c_q(x).view(b, t, self.num_heads, self.head_dim)))
        k = self.rotary(rms_norm(self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim)))
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim)
        y = causal_attention(q * self.q_gain.to(x.dtype)[:, None], k, v, cu_seqlens)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.gate is not None:
            y = y * (2.0 * torch.sigmoid(F.linear(x[..., :GATE_INPUTS], self.gate.to(x.dtype)))).unsqueeze(-1)
        return self.proj(y.reshape(b, t, dim))


class MLP(nn.Module):
    """LeakyReLU(0.5)^2 feed-forward (R3 / PR #549; relu^2 from the modded-nanogpt speedruns)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square())


class Block(nn.Module):
    """Pre-norm block: a learned mix of the embedding x0 into the residual stream, per-channel output scales, normed
    inputs scaled by 1/sqrt(layer+1) (LN scale, 2026-03-21); `attend` and `feed` are its two residual updates. The
    scale is a buffer, not a float, so that every block runs the same compiled code (compiled_blocks)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int, rotary: Rotary,
                 qk_gain_init: float, xsa: bool, attn_gate: bool, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rotary, qk_gain_init, xsa, attn_gate)
        self.mlp = MLP(dim, hidden)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer_idx + 1)), persistent=False)

    def attend(self, x: torch.Tensor, x0: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        return x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale, cu_seqlens)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed(self.attend(x, x0, cu_seqlens))


class BigramHash(nn.Module):
    """Embedding of a hash of the (previous, current) *input* token pair, projected to model_dim (R1, 2026-03-20):
    bucket[t] = (36313 * tok[t] XOR 27191 * tok[t-1]) mod (buckets - 1), the reserved last bucket at position 0 and
    every BOS (no pair spans two documents). Table zero-initialised, projection orthogonal, scale 0.05."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.embed = Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> bucket ids (B, T) int64."""
        cur = input_ids.to(torch.int32)
        prev = F.pad(cur[:, :-1], (1, 0))
        hashed = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.buckets - 1)
        first = torch.arange(cur.size(1), device=cur.device) == 0
        return torch.where(first | (cur == self.bos_id), self.buckets - 1, hashed).long()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(self.bucket_ids(input_ids))) * self.scale


class SmearGate(nn.Module):
    """x_t += sigmoid(g) * (x_{t-1} - x_t), a learned per-channel blend with the previous position (R1; g starts at 0),
    off at position 0 and wherever the current token is BOS (the BOS fix of R8 / issue #1797)."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.gate, self.bos_id = nn.Parameter(torch.zeros(dim)), bos_id

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), input_ids: (B, T) -> (B, T, D)."""
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        keep = (input_ids != self.bos_id) & (torch.arange(input_ids.size(1), device=input_ids.device) > 0)
        return x + keep.unsqueeze(-1).to(x.dtype) * torch.sigmoid(self.gate).to(x.dtype) * (prev - x)


def layer_order(num_layers: int, num_loops: int, loop_start: int, loop_end: int) -> list[int]:
    """Block indices in run order: blocks loop_start..loop_end repeat 1 + num_loops times (depth recurrence, R6-R8: 11
    blocks with 3..5 given two extra passes run as 17 virtual layers); num_loops == 0 ignores the loop range."""
    if num_loops == 0:
        return list(range(num_layers))
    looped = list(range(loop_start, loop_end + 1)) * (1 + num_loops)
    return list(range(loop_start)) + looped + list(range(loop_end + 1, num_layers))


class GPT(nn.Module):
    """Decoder-only transformer with tied embeddings and a tanh logit softcap; blocks run in `layer_order` (the extra
    passes only while `looping`). U-Net skips: the first half of the passes push outputs, each later one merges the
    mirrored one in (`merge_skip`: added, or sigmoid-gated with skip_gates, R7); from block `parallel_start` on,
    attention and MLP update two lanes merged by a learned weight (R7). With doc_mask, pass cu_seqlens from `segments`.
    input_ids (B, T) int64 -> logits (B, T, V), or with targets (B, T) mean or per-token ("none") NLL in nats."""

    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                 mlp_mult: float, rope_dims: int, rope_base: float, qk_gain_init: float, xsa_last_n: int,
                 bigram_buckets: int, bigram_dim: int, logit_softcap: float, tied_embed_init_std: float,
                 max_seq_len: int, bos_id: int, num_loops: int = 0, loop_start: int = 0, loop_end: int = 0,
                 doc_mask: bool = False, parallel_start: int = 0, skip_gates: bool = False, attn_gate: bool = False):
        super().__init__()
        self.logit_softcap, self.bos_id, self.doc_mask = logit_softcap, bos_id, doc_mask
        self.parallel_start = parallel_start
        self.orders = {False: list(range(num_layers)), True: layer_order(num_layers, num_loops, loop_start, loop_end)}
        self.looping = num_loops > 0
        rotary = Rotary(rope_dims, rope_base, max_seq_len)
        self.tok_emb = Embedding(vocab_size, model_dim)
        self.bigram = BigramHash(bigram_buckets, bigram_dim, model_dim, bos_id)
        self.smear = SmearGate(model_dim, bos_id)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, num_kv_heads, int(mlp_mult * model_dim), rotary,
                                          qk_gain_init, i >= num_layers - xsa_last_n, attn_gate, i)
                                    for i in range(num_layers))
        decoder_steps = max(len(order) - len(order) // 2 for order in self.orders.values())
        self.skip_weights = nn.Parameter(torch.ones(decoder_steps, model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(decoder_steps, model_dim)) if skip_gates else None
        self.lane_merge = nn.Parameter(torch.tensor(0.5)) if 0 < parallel_start < num_layers else None
        self.final_norm = nn.RMSNorm(model_dim, elementwise_affine=False)  # its output is the head's input
        self.head_lora = None  # TTT's per-document adapter of the tied output layer (DocumentLoRA), else None
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        nn.init.zeros_(self.bigram.embed.weight)
        nn.init.orthogonal_(self.bigram.proj.weight)
        for block in self.blocks:
            for layer in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(block.attn.proj.weight)  # residual branches start as identity
            nn.init.zeros_(block.mlp.proj.weight)

    def segments(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """cu_seqlens (`doc_segments`) if the model masks documents, else None; call it outside the compiled graph."""
        return doc_segments(input_ids, self.bos_id) if self.doc_mask else None

    def merge_skip(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                cu_seqlens: torch.Tensor | None = None):
        x = rms_norm(self.tok_emb(input_ids) + self.bigram(input_ids))
        if torch.is_autocast_enabled(x.device.type):  # a bf16 residual stream, as in the records
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = x0 = self.smear(x, input_ids)
        skips, order, mlp_lane = [], self.orders[self.looping], None
        num_encoder = len(order) // 2
        for j, i in enumerate(order):
            if j >= num_encoder and skips:
                x = self.merge_skip(j - num_encoder, x, skips.pop())
            if j >= num_encoder and 0 < self.parallel_start <= i:
                mlp_lane = self.blocks[i].feed(x if mlp_lane is None else mlp_lane)
                x = self.blocks[i].attend(x, x0, cu_seqlens)
            else:
                x = self.blocks[i](x, x0, cu_seqlens)
            if j < num_encoder:
                skips.append(x)
        if mlp_lane is not None:
            x = torch.lerp(mlp_lane, x, self.lane_merge.to(x.dtype))
        x = self.final_norm(x)  # the tied head, plus TTT's adapter of it while DocumentLoRA installs one
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) + (0 if self.head_lora is None else self.head_lora(x))
        logits = self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)
        if targets is None:
            return logits
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return nll if reduction == "mean" else nll.view_as(targets)


# GPT's arguments that are settings, in its signature's order (the artifact's config keeps it)
MODEL_FIELDS = tuple(k for k in inspect.signature(GPT).parameters if k not in ("max_seq_len", "bos_id"))


def model_config(args: Hyperparameters, bos_id: int) -> dict:
    """The GPT constructor's arguments; stored inside the artifact so it rebuilds the model alone."""
    return {**{k: getattr(args, k) for k in MODEL_FIELDS}, "max_seq_len": args.train_seq_len, "bos_id": bos_id}


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The matrices of every linear layer: attention/MLP projections and the bigram projection."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """U V^T of g (..., m, n) by quintic Newton-Schulz in bf16, with Muon's coefficients (Jordan et al. 2024)."""
    transposed = g.size(-2) > g.size(-1)
    x = (g.mT if transposed else g).bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        a = x @ x.mT
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * (a @ a)) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024) with decoupled weight decay. Per 2-D parameter:
    buf = momentum*buf + grad; update = NS5(grad + momentum*buf) (Nesterov), scaled by sqrt(max(1, rows/cols));
    p -= lr*wd*p + lr*update; row_normalize (MuonEq-R, R7/R8) first scales each row of the Nesterov update to unit norm.
    Equal shapes go in one batched call; rank r does every world_size-th of each shape, one all-reduce shares them."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, rt: Runtime,
                 row_normalize: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.rt, self.row_normalize = rt, row_normalize
        self.orthogonalize = maybe_compile(newton_schulz5, rt.device)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, momentum = group["params"], group["momentum"]
            offsets = np.cumsum([0] + [p.numel() for p in params])
            flat = torch.zeros(int(offsets[-1]), device=params[0].device, dtype=torch.bfloat16)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            for shape, idx in by_shape.items():
                mine = idx[self.rt.rank :: self.rt.world_size]
                if not mine:
                    continue
                grads = [params[i].grad for i in mine]
                bufs = [self.state[params[i]].setdefault("momentum", torch.zeros_like(g)) for i, g in zip(mine, grads)]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                nesterov = torch.stack(torch._foreach_add(grads, bufs, alpha=momentum))
                if self.row_normalize:
                    nesterov = nesterov / nesterov.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                update = self.orthogonalize(nesterov) * max(1.0, shape[0] / shape[1]) ** 0.5
                for j, i in enumerate(mine):
                    flat[offsets[i] : offsets[i + 1]] = update[j].flatten()
            all_reduce(flat, self.rt)
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [flat[offsets[i] : offsets[i + 1]].view_as(p) for i, p in enumerate(params)],
                                alpha=-group["lr"])


def build_optimizers(model: GPT, args: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon for block matrices and the bigram projection; Adam for embeddings (with WD) and scalars."""
    matrices = linear_weights(model)
    embeddings = [model.tok_emb.weight, model.bigram.embed.weight]
    taken = {id(p) for p in matrices + embeddings}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam = torch.optim.AdamW([dict(params=embeddings, lr=args.embed_lr, weight_decay=args.adam_wd),
                              dict(params=scalars, lr=args.scalar_lr, weight_decay=0.0)],
                             betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=rt.device.type == "cuda")
    muon = Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_wd, rt, args.muon_row_normalize)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [adam, muon]


# ---- 6. Training: wall-clock capped, warm-down by time, EMA ----------------------------------

def lr_scale(progress: float, warmdown_frac: float) -> float:
    """1 until the last `warmdown_frac` of training, then linear to 0 at progress 1 (progress in [0, 1])."""
    return 1.0 if warmdown_frac <= 0.0 else max(0.0, min(1.0, (1.0 - progress) / warmdown_frac))


class EMA:
    """Exponential moving average of all parameters, kept in fp32: shadow += (1 - decay) * (p - shadow)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.params = decay, list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)


def grad_accum_steps(args: Hyperparameters, rt: Runtime) -> int:
    """GRAD_ACCUM_STEPS, or enough micro-batches of MICRO_BATCH_TOKENS per GPU to make the global batch."""
    accum = args.grad_accum_steps or math.ceil(args.train_batch_tokens / (rt.world_size * args.micro_batch_tokens))
    if args.train_batch_tokens % (rt.world_size * accum * args.train_seq_len):
        raise ValueError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} is not a multiple of WORLD_SIZE*"
                         f"GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN={rt.world_size}*{accum}*{args.train_seq_len}; "
                         "change GRAD_ACCUM_STEPS")
    return accum


def finite_loss(loss: torch.Tensor, step: int, rt: Runtime, weights: list[torch.Tensor] = ()) -> float:
    """The training loss averaged over ranks (a sync); FloatingPointError if it or any of `weights` holds nan/inf."""
    value = all_reduce(loss.detach().float().clone().to(rt.device), rt).item() / rt.world_size
    bad_weights = not all(bool(w.isfinite().all()) for w in weights)
    if bad_weights or not math.isfinite(value):
        raise FloatingPointError(f"train_loss {value}{' and nan/inf weights' if bad_weights else ''} at step {step}: "
                                 "training diverged; lower the learning rates (MATRIX_LR, EMBED_LR, SCALAR_LR)")
    return value


def wrap_for_training(model: GPT, rt: Runtime) -> nn.Module:
    """torch.compile (GPU), then DistributedDataParallel when several ranks run."""
    if not rt.distributed:
        return maybe_compile(model, rt.device)
    device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
    return DistributedDataParallel(maybe_compile(model, rt.device), device_ids=device_ids, broadcast_buffers=False)


def train_step(net: nn.Module, model: GPT, optimizers: list, batches: list, grad_clip_norm: float,
               rt: Runtime) -> torch.Tensor:
    """One optimizer step over micro-batches [(x, y), ...] (DDP syncs on the last) -> mean loss, a device scalar."""
    total = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(batches):
        sync_grads = not rt.distributed or micro == len(batches) - 1
        with (contextlib.nullcontext() if sync_grads else net.no_sync()), autocast(rt.device):
            loss = net(x, y, cu_seqlens=model.segments(x))
        (loss / len(batches)).backward()
        total += loss.detach() / len(batches)
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total


def train(args: Hyperparameters, model: GPT, loader: TokenLoader, rt: Runtime, accum: int, log: Logger,
          budget_seconds: float) -> tuple[int, float, EMA]:
    """Train until `budget_seconds` of wall clock (or ITERATIONS); returns (steps, seconds of the timed loop, EMA).
    First WARMUP_STEPS steps on random tokens prime torch.compile (both depth-recurrence graphs), then the model and
    optimizers are reset. The LR warm-down follows the budget fraction used; stopping and the extra passes (from
    LOOP_FROM of the budget) are decided as the max over ranks, so all ranks switch at the same step."""
    net = wrap_for_training(model, rt)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    warm_opts = build_optimizers(model, args, rt)
    seqs, delayed_loops = loader.seqs_per_rank, args.num_loops > 0 and args.loop_from > 0
    for step in range(args.warmup_steps):
        model.looping = args.num_loops > 0 and not (delayed_loops and step % 2 == 0)  # compile both graphs
        rand = torch.randint(0, args.vocab_size, (accum, seqs, args.train_seq_len + 1), device=rt.device)
        train_step(net, model, warm_opts, [(r[:, :-1], r[:, 1:]) for r in rand], args.grad_clip_norm, rt)
    synchronize(rt.device)
    model.load_state_dict(initial_state)
    model.looping = args.num_loops > 0 and not delayed_loops
    del warm_opts, initial_state
    optimizers = build_optimizers(model, args, rt)
    ema = EMA(model, args.ema_decay)
    log(f"train_start warmup_steps {args.warmup_steps} (random tokens, state reset) budget {budget_seconds:.1f}s "
        f"grad_accum {accum} seqs_per_micro_batch {seqs}")

    t0 = time.perf_counter()
    n, loss, elapsed, progress = 0, torch.zeros(()), 0.0, 0.0
    while n < args.iterations:
        scale = lr_scale(progress, args.warmdown_frac)
        frac = min(n / max(1, args.muon_momentum_warmup_steps), 1.0)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
                if isinstance(opt, Muon):
                    group["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        loss = train_step(net, model, optimizers, [loader.next_batch() for _ in range(accum)], args.grad_clip_norm, rt)
        ema.update()
        n += 1
        if n % args.log_every == 0:
            synchronize(rt.device)
        elapsed = time.perf_counter() - t0
        progress = max(elapsed / budget_seconds, n / args.iterations)  # the fraction of the budget used
        stop, loop_due = elapsed >= budget_seconds, progress >= args.loop_from
        if rt.distributed:  # every rank stops (and starts the extra passes) at the same step
            flags = all_reduce(torch.tensor([float(stop), float(loop_due)], device=rt.device), rt, dist.ReduceOp.MAX)
            stop, loop_due = bool(flags[0] > 0), bool(flags[1] > 0)
        if stop:
            break
        if args.num_loops > 0 and not model.looping and loop_due:
            model.looping = True
            log(f"depth_recurrence on at step {n} passes {len(model.orders[True])} (from {len(model.orders[False])})")
        if n % args.log_every == 0:
            log(f"step {n} train_loss {finite_loss(loss, n, rt):.4f} lr_scale {scale:.3f} train_time {elapsed:.1f}s "
                f"step_avg {1000 * elapsed / n:.1f}ms")
    synchronize(rt.device)
    elapsed = time.perf_counter() - t0
    model.looping = args.num_loops > 0  # the exported model always runs its extra passes
    log(f"train_end steps {n} train_loss {finite_loss(loss, n, rt, ema.shadow):.4f} loop_time {elapsed:.1f}s "
        f"step_avg {1000 * elapsed / max(n, 1):.1f}ms")
    return n, elapsed, ema


# ---- 7. Quantization: GPTQ int6 block matrices, int7 embeddings, rANS + zstd-22 artifact ---

QUANT_MIN_NUMEL = 65_536  # float tensors up to this size are stored as fp16 (2-D) or fp32 (1-D)
INT6_MAX, INT7_MAX = 31, 63  # block matrices int6, embeddings int7 (GPTQ wherever a Hessian exists)
INT_KINDS = {INT6_MAX: "int6", INT7_MAX: "int7"}  # artifact entry kind of each code range
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
ARTIFACT_MAGIC = b"PGOLF-INT-3\n"  # then the rANS words' count and checksum, the words, a zstd frame


def collect_hessians(model: GPT, loader: TokenLoader, batches: int, rt: Runtime) -> dict[str, torch.Tensor]:
    """GPTQ Hessians H = E[x x^T] on training batches of the inputs of every block linear layer and of the tied head
    (the final normed hidden state, for tok_emb.weight) -> {weight name: (in, in) fp32}, mean over tokens and ranks."""
    sums: dict[str, torch.Tensor] = {}

    def accumulate(key: str, x: torch.Tensor) -> None:
        x = x.detach().flatten(0, -2).float()
        sums[key] = sums.get(key, 0) + x.T @ x
    hooks = [model.final_norm.register_forward_hook(lambda _m, _i, out: accumulate("tok_emb.weight", out))]
    for name, module in model.blocks.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda _m, inputs, _o, key=f"blocks.{name}.weight": accumulate(key, inputs[0])))
    try:
        with torch.inference_mode(), autocast(rt.device):
            for _ in range(batches):
                x, _ = loader.next_batch()
                model(x, cu_seqlens=model.segments(x))
    finally:
        for h in hooks:
            h.remove()
    tokens = all_reduce(torch.tensor(float(batches * loader.seqs_per_rank * loader.seq_len), device=rt.device), rt)
    return {k: all_reduce(v, rt) / tokens for k, v in sums.items()}


def choose_row_scales(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """GPTQ-lite's clip search (R2): w (..., rows, cols) fp32 -> fp16-exact scales (..., rows) of least rounding MSE."""
    best_scale, best_err = None, torch.full(w.shape[:-1], math.inf, device=w.device)
    for q in CLIP_QUANTILES:
        clip = w.abs().amax(-1) if q == 1.0 else torch.quantile(w.abs(), q, dim=-1)
        scale = (clip / qmax).clamp_min(1e-6).half().float()
        err = (w - (w / scale[..., None]).round().clamp(-qmax, qmax) * scale[..., None]).square().sum(-1)
        best_scale = scale if best_scale is None else torch.where(err < best_err, scale, best_scale)
        best_err = torch.minimum(err, best_err)
    return best_scale


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int, block: int = 128,
                  damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al., ICLR 2023) with act-order, batched: w (L, rows, cols) fp32, h (L, cols, cols) input
    Hessians, scale (L, rows) fixed per-row scales -> int8 codes (L, rows, cols) in [-qmax, qmax]. Columns go in order
    of decreasing Hessian diagonal, each one's rounding error propagated to later ones via inverse-Hessian Cholesky."""
    w, h = w.clone().float(), h.clone().float()
    L, rows, cols = w.shape
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    perm = torch.argsort(diag, dim=-1, descending=True)
    w = w.gather(-1, perm[:, None, :].expand(L, rows, cols))
    h = h.gather(-1, perm[:, None, :].expand(L, cols, cols)).gather(-2, perm[:, :, None].expand(L, cols, cols))
    eye = torch.eye(cols, device=h.device)
    for attempt in range(5):
        try:
            damped = h + (damp * 10**attempt) * h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
            break
        except torch.linalg.LinAlgError:
            if attempt == 4:
                raise
    s, q_all = scale[:, :, None], torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb, hb = w[:, :, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        errs = torch.zeros_like(wb)
        for j in range(i2 - i1):
            q = (wb[:, :, j : j + 1] / s).round().clamp(-qmax, qmax)
            q_all[:, :, i1 + j] = q[:, :, 0]
            err = (wb[:, :, j : j + 1] - q * s) / hb[:, j, j][:, None, None]
            wb[:, :, j:] -= err * hb[:, j : j + 1, j:]
            errs[:, :, j] = err[:, :, 0]
        w[:, :, i2:] -= errs @ hinv[:, i1:i2, i2:]
    return torch.empty_like(q_all).scatter_(-1, perm[:, None, :].expand(L, rows, cols), q_all).to(torch.int8)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round-to-nearest codes: w (..., rows, cols) / scale (..., rows) -> int8 in [-qmax, qmax]."""
    return (w / scale[..., None]).round().clamp(-qmax, qmax).to(torch.int8)


def is_large_matrix(t: torch.Tensor) -> bool:
    """2-D tensors above QUANT_MIN_NUMEL: stored as integer codes with per-row scales."""
    return t.ndim == 2 and t.numel() > QUANT_MIN_NUMEL


def quantize_small_tensors(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Entries for every tensor that is not a large matrix: fp16 (2-D) or fp32 (1-D)."""
    return {name: {"kind": "fp16" if t.ndim >= 2 else "fp32",
                   "data": t.detach().to(torch.float16 if t.ndim >= 2 else torch.float32)}
            for name, t in state.items() if not is_large_matrix(t)}


@dataclass
class MatrixGroup:
    """Large matrices of one role (e.g. attn.c_q of every layer), stacked: w (L, rows, cols), their
    GPTQ Hessians h (L, cols, cols) or None, clip-searched scales (L, rows) and the code range qmax."""

    names: list[str]
    w: torch.Tensor
    h: torch.Tensor | None
    scale: torch.Tensor
    qmax: int


def matrix_groups(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> list[MatrixGroup]:
    """Group the large matrices by role: block matrices get int6 codes, embeddings int7 codes."""
    roles: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if is_large_matrix(t):
            role = name.split(".", 2)[2] if name.startswith("blocks.") else name
            roles.setdefault((role, tuple(t.shape), name in hessians), []).append(name)
    groups = []
    for (_, _, has_h), names in roles.items():
        qmax = INT6_MAX if names[0].startswith("blocks.") else INT7_MAX
        w = torch.stack([state[n].detach().float() for n in names])
        h = torch.stack([hessians[n] for n in names]).to(w.device) if has_h else None
        groups.append(MatrixGroup(names, w, h, choose_row_scales(w, qmax), qmax))
    return groups


def quantize_groups(groups: list[MatrixGroup], alpha: float, use_gptq: bool) -> dict[str, dict]:
    """Integer entries for every group with step sizes alpha * scale (GPTQ where a Hessian exists)."""
    entries = {}
    for g in groups:
        scale = (g.scale * alpha).half().float()
        q = (gptq_quantize(g.w, g.h, scale, g.qmax) if use_gptq and g.h is not None
             else quantize_rows(g.w, scale, g.qmax))
        for i, n in enumerate(g.names):
            entries[n] = {"kind": INT_KINDS[g.qmax], "q": q[i], "scale": scale[i].half()}
    return entries


def quantize_to_fit(groups: list[MatrixGroup], small: dict[str, dict], config: dict, max_bytes: int,
                    tolerance: float = 5e-4) -> tuple[dict[str, dict], float]:
    """Fit max_bytes to within `tolerance` (a fraction) -> (entries, alpha): step sizes times the smallest alpha >= 1
    that fits, by bisection on round-to-nearest codes, then GPTQ at that alpha, moved by steps of ~n_codes/8 bytes per
    doubling (ours) into [max_bytes * (1 - tolerance), max_bytes] (or anywhere under at alpha 1 or the 4th GPTQ run).
    Sizes: pack_artifact's with order-0 entropy for rANS words, the result's by packing it. ValueError if none fits."""

    def size(entries: dict) -> int:
        rest, codes = serialize_artifact(config, {**small, **entries})
        nats = -sum(float(torch.xlogy(c, c / c.sum()).sum()) for c in (torch.tensor(h).double() for _, h in codes))
        return (len(ARTIFACT_MAGIC) + 12 + 4 * math.ceil(nats / math.log(2) / 32 + 2)  # 2 words: the final state
                + len(zstandard.ZstdCompressor(level=22, write_checksum=True).compress(rest)))
    lo, hi = 1.0, 1.0
    while hi <= 1e3 and size(quantize_groups(groups, hi, use_gptq=False)) > max_bytes:  # at 1e3 every code is 0
        lo, hi = hi, hi * 1.25
    for _ in range(8 if 1.0 < hi <= 1e3 else 0):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(quantize_groups(groups, mid, use_gptq=False)) <= max_bytes else (mid, hi)
    alpha, fix, runs, n_codes = hi, 0, 0, max(sum(g.w.numel() for g in groups), 1)  # fix: real size - estimate
    while alpha <= 1e3:
        entries, runs = {**small, **quantize_groups(groups, alpha, use_gptq=True)}, runs + 1
        est = size(entries) + fix
        if est <= max_bytes and (est >= max_bytes * (1 - tolerance) or alpha == 1.0 or runs >= 4):
            if (real := len(pack_artifact(config, entries))) <= max_bytes:
                return entries, alpha
            fix, est = fix + real - est, real
        alpha = max(1.0, alpha * 2.0 ** (8 * (est - max_bytes * (1 - tolerance / 2)) / n_codes))
    raise ValueError(f"cannot fit the artifact in {max_bytes} bytes: the small tensors alone take {size({})} packed; "
                     "use a smaller model or vocabulary")


def dequantize_entries(entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse of the quantizers (up to rounding): fp32 tensors."""
    return {name: e["q"].float() * e["scale"].float()[:, None] if e["kind"] in INT_KINDS.values() else e["data"].float()
            for name, e in entries.items()}


def code_model(counts: list[int]):
    """constriction's Categorical model of codes min, min+1, ... from their histogram (the same for the decoder)."""
    return constriction.stream.model.Categorical(np.array(counts, np.float64) / sum(counts), perfect=False)


def serialize_artifact(config: dict, entries: dict[str, dict]) -> tuple[bytes, list[tuple[torch.Tensor, list[int]]]]:
    """The artifact's content, no pickle -> (rest, codes). rest: raw arrays other than codes, by kind (int6/int7 scales,
    fp16, fp32), a JSON header (config; per array name, kind, field, dtype, shape, offset in rest or, for codes, their
    minimum and histogram) and its 8-byte length. codes: (codes - min, flat, histogram) per int6/int7 tensor."""
    header, parts, codes, offset = {"config": config, "tensors": []}, [], [], 0
    order = [(k, f) for f in ("q", "scale") for k in INT_KINDS.values()] + [("fp16", "data"), ("fp32", "data")]
    for kind, field in order:
        for name, e in ((name, e) for name, e in entries.items() if e["kind"] == kind):
            t = e[field].detach()
            info = {"name": name, "kind": kind, "field": field, "dtype": str(t.dtype)[6:], "shape": list(t.shape)}
            if field == "q":
                sym = t.flatten() - (low := int(t.min()))  # int8 (0..2 qmax): bincount is fastest on it
                codes.append((sym, torch.bincount(sym, minlength=2).tolist()))  # constriction refuses a 1-symbol table
                info.update(min=low, counts=codes[-1][1])
            else:
                parts.append((arr := t.cpu().contiguous().numpy()).tobytes())
                info["offset"], offset = offset, offset + arr.nbytes
            header["tensors"].append(info)
    head = json.dumps(header).encode()
    return b"".join(parts) + head + len(head).to_bytes(8, "little"), codes


def pack_artifact(config: dict, entries: dict[str, dict]) -> bytes:
    """The file's bytes: ARTIFACT_MAGIC, the rANS words' count (8 bytes LE) and BLAKE2b-32 (4), the words (uint32 LE):
    all int6/int7 codes in one rANS stream (Duda 2013; constriction's AnsCoder, Bamler 2022), each tensor's under the
    Categorical model of its histogram (order-0 entropy + a few bytes), then serialize_artifact's rest as zstd-22."""
    rest, codes = serialize_artifact(config, entries)
    coder = constriction.stream.stack.AnsCoder()
    for sym, counts in reversed(codes):  # a stack: the last tensor goes in first, so decoding runs in header order
        coder.encode_reverse(sym.cpu().numpy().astype(np.int32), code_model(counts))
    words = coder.get_compressed().astype("<u4").tobytes()
    return (ARTIFACT_MAGIC + (len(words) // 4).to_bytes(8, "little") + hashlib.blake2b(words, digest_size=4).digest()
            + words + zstandard.ZstdCompressor(level=22, write_checksum=True).compress(rest))


def unpack_artifact(blob: bytes, source: str = "blob") -> tuple[dict, dict[str, dict]]:
    """Inverse of pack_artifact -> (config, entries); ValueError naming `source` if it is not an artifact of this format
    (magic), or truncated or corrupted (the words' length and checksum, zstd's checksum, the rANS stream's end)."""
    bad = f"{source} is truncated or not a train_gpt.py artifact"
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ValueError(f"{bad} (bad magic)")
    end = (at := len(ARTIFACT_MAGIC) + 12) + 4 * int.from_bytes(blob[at - 12 : at - 4], "little")  # the words: at:end
    if len(blob) < end or hashlib.blake2b(blob[at:end], digest_size=4).digest() != blob[at - 4 : at]:
        raise ValueError(f"{bad} (rANS words: length or checksum)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob[end:], max_output_size=1 << 31)
    except zstandard.ZstdError as e:
        raise ValueError(f"{bad} (zstd: {e})") from None
    header = json.loads(raw[-8 - int.from_bytes(raw[-8:], "little") : -8])
    decoder, entries = constriction.stream.stack.AnsCoder(np.frombuffer(blob[at:end], "<u4").astype(np.uint32)), {}
    for t in header["tensors"]:
        arr = ((decoder.decode(code_model(c := t["counts"]), sum(c)) + t["min"]).astype(t["dtype"]) if t["field"] == "q"
               else np.frombuffer(raw, np.dtype(t["dtype"]), int(np.prod(t["shape"])), t["offset"]).copy())
        entries.setdefault(t["name"], {"kind": t["kind"]})[t["field"]] = torch.from_numpy(arr.reshape(t["shape"]))
    if not decoder.is_empty():  # the models differ from the encoder's (another constriction version?) or the header
        raise ValueError(f"{bad} (rANS stream not at its end after the last code)")
    return header["config"], entries


def load_artifact_model(path: str, device: torch.device) -> tuple[GPT, dict]:
    """Build a fresh GPT from the artifact file alone (config + dequantized weights)."""
    with open(path, "rb") as f:
        config, entries = unpack_artifact(f.read(), path)
    model = GPT(**config)
    model.load_state_dict(dequantize_entries(entries), strict=True)
    return model.to(device), config


# ---- 8. Evaluation: every target scored exactly once, in stream order ------------------------

def sliding_windows(n_targets: int, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows covering targets 0..n_targets-1 exactly once, each with >= seq_len-stride context -> (starts,
    score_from), int64 of equal length. Window i reads tokens[start_i : start_i + seq_len] and scores its positions >=
    from_i (target j is token j+1): the first all of them, each later one the `stride` targets after the previous
    (stride == seq_len: non-overlapping). ValueError if n_targets < seq_len."""
    if n_targets < seq_len:
        raise ValueError(f"validation has {n_targets} targets, fewer than one {seq_len}-token window")
    firsts = torch.arange(seq_len, n_targets, stride)
    ends = (firsts + stride).clamp_max(n_targets)
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), ends - seq_len))
    score_from = torch.cat((torch.zeros(1, dtype=torch.int64), firsts - (ends - seq_len)))
    return starts, score_from


class ScoreBoard:
    """Per-target NLL (nats, fp32) and a count of how often each target was scored, on one device."""

    def __init__(self, n_targets: int, device: torch.device):
        self.nll, self.count = (torch.zeros(n_targets, device=device, dtype=d) for d in (torch.float32, torch.int32))

    def add(self, targets: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add nll (k,) at target indices (k,) int64; with a bool mask (k,), only where it is set (no host sync)."""
        nll, ones = (nll.float(), torch.ones_like(targets, dtype=torch.int32)) if mask is None else \
            (torch.where(mask, nll.float(), 0.0), mask.int())
        self.nll.index_put_((targets,), nll, accumulate=True)
        self.count.index_put_((targets,), ones, accumulate=True)

    def finalize(self, bytes_per_target: torch.Tensor, rt: Runtime) -> tuple[float, float]:
        """All-reduce, check every target was scored exactly once, return (mean NLL, bpb)."""
        all_reduce(self.nll, rt)
        all_reduce(self.count, rt)
        if not bool((self.count == 1).all()):
            raise RuntimeError(f"scoring error: {(self.count != 1).sum().item()} targets not scored exactly once")
        total = float(self.nll.double().sum())
        return total / self.nll.numel(), bits_per_byte(total, int(bytes_per_target.sum()))


@torch.inference_mode()
def score_windows(model_fn, tokens: torch.Tensor, starts: torch.Tensor, score_from: torch.Tensor,
                  batch: int, seq_len: int, board: ScoreBoard, device: torch.device) -> None:
    """Score the given windows in batches of `batch` (the last padded by repetition), writing into board."""
    offsets = torch.arange(seq_len + 1, device=device)
    for i in range(0, len(starts), batch):
        s, f = starts[i : i + batch].to(device), score_from[i : i + batch].to(device)
        real = len(s)
        if real < batch:
            s, f = torch.cat((s, s[-1:].expand(batch - real))), torch.cat((f, f[-1:].expand(batch - real)))
        window = tokens[s[:, None] + offsets]
        with autocast(device):
            nll = model_fn(window[:, :-1], window[:, 1:], "none", model_fn.segments(window[:, :-1])).float()
        mask = offsets[None, :seq_len] >= f[:, None]
        mask[real:] = False
        board.add((s[:, None] + offsets[None, :seq_len])[mask], nll[mask])


def rank_slice(n: int, rt: Runtime) -> slice:
    return slice(n * rt.rank // rt.world_size, n * (rt.rank + 1) // rt.world_size)


def evaluate(model_fn, tokens: torch.Tensor, bytes_per_target: torch.Tensor, stride: int, args: Hyperparameters,
             rt: Runtime) -> tuple[float, float, ScoreBoard]:
    """Score all targets with windows of TRAIN_SEQ_LEN at `stride`, split across ranks -> (loss, bpb, board)."""
    n = tokens.numel() - 1
    starts, score_from = sliding_windows(n, args.train_seq_len, stride)
    mine, board = rank_slice(len(starts), rt), ScoreBoard(n, rt.device)
    score_windows(model_fn, tokens, starts[mine], score_from[mine], args.eval_batch_seqs, args.train_seq_len,
                  board, rt.device)
    return *board.finalize(bytes_per_target, rt), board


def warm_up_eval_graphs(model: GPT, model_fn, args: Hyperparameters, rt: Runtime) -> None:
    """Compile the scoring graph on random tokens (never validation tokens); weights unchanged; no-op if model_fn is the
    eager model (CPU). Inputs are views of (rows, seq_len + 1) windows, as in score_windows: torch.compile guards on
    strides, and contiguous ones compiled graphs the real passes could not use (2 extra compilations, ~170 s)."""
    if model_fn is model:
        return
    with torch.inference_mode(), autocast(rt.device):
        x = torch.randint(0, args.vocab_size, (args.eval_batch_seqs, args.train_seq_len + 1), device=rt.device)
        model_fn(x[:, :-1], x[:, 1:], "none", model.segments(x[:, :-1]))
    synchronize(rt.device)


# Score-first per-document LoRA TTT (R6 PR #1667 / R7 PR #1530): each document gets fresh adapters, read in chunks.
LORA_BETA2, LORA_CHECK_EVERY, LORA_SCORE_COST = 0.999, 32, 0.5  # Adam beta2; steps between deadline checks (each
# synchronizes the device); assumed cost of a step that only scores (a forward) relative to one that also adapts


def document_spans(tokens: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths), int64 on CPU, of the stream's documents in order: one starts at 0 and at every BOS and owns
    the targets whose input token it holds, so the spans partition targets 0..n-1 (tokens (n+1,), target j =
    tokens[j+1]); a stream that does not begin with BOS starts with a partial document, scored like the others."""
    n = tokens.numel() - 1
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), (tokens[1:n].cpu() == bos_id).nonzero().flatten() + 1))
    return starts, torch.diff(starts, append=torch.tensor([n]))


@torch.library.custom_op("train_gpt::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm opaque to torch.compile (whose checks admit bf16 only): a (M, K) @ b (S, K, N) -> (M, N), rows
    ..offs[s]-1 times b[s] (offs (S,) int32 group ends); or a (K, M) @ b (M, N) -> (S, K, N), per group of M."""
    return torch._grouped_mm(a, b, offs=offs)


grouped_mm.register_fake(lambda a, b, offs: a.new_empty(a.size(0), b.size(-1)) if b.dim() == 3 else
                         a.new_empty(offs.size(0), a.size(0), b.size(1)))
grouped_mm.register_autograd(  # of the (M, K) x (S, K, N) form: dA = dY B_s^T, dB_s = A^T dY per group
    lambda ctx, g: (grouped_mm(g.contiguous(), ctx.saved_tensors[1].transpose(1, 2), ctx.saved_tensors[2]),
                    grouped_mm(ctx.saved_tensors[0].t(), g.contiguous(), ctx.saved_tensors[2]), None),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


class LoRALinear(nn.Module):
    """A frozen linear layer plus per-window adapters (LoRA, Hu et al. 2021): x (R, T, in) -> base(x) + (x_s @ a[s]) @
    b[s] for the tokens of slot s (a (S, in, r), b (S, r, out); offs: lora_step's slot ends in the flattened R*T).
    With base None, the adapter's term alone (the tied output layer's, added to the logits by GPT.forward)."""

    def __init__(self, base: nn.Linear | None, a: nn.Parameter, b: nn.Parameter, offs: torch.Tensor):
        super().__init__()
        self.base, self.a, self.b = base, a, b
        self.register_buffer("offs", offs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.base is None else self.base(x)  # bf16 under autocast: the grouped GPU kernel's dtype
        h = grouped_mm(x.flatten(0, -2).to(y.dtype), self.a.to(y.dtype), self.offs)
        delta = grouped_mm(h, self.b.to(y.dtype), self.offs).view(*x.shape[:-1], -1)
        return delta if self.base is None else y + delta


class DocumentLoRA:
    """Rank-r adapters on every block linear layer (attention q, k, v, proj; MLP fc, proj) and the tied head (R6) of
    a frozen model, installed as LoRALinear wrappers until `remove`, for lora_step's steps of `rows` rows. Each of
    up to `docs` documents in flight owns a row of `weights` (all its layers' A then B), `v` (Adam's second moments) and
    `steps`; row `docs` backs empty slots. A step loads its windows' rows into `slots` (docs, P), whose views are every
    layer's A, B. A fresh row is `init` (A uniform in +-1/sqrt(in) from a fixed seed, B zero; v and steps zero)."""

    def __init__(self, model: GPT, rows: int, docs: int, rank: int, device: torch.device):
        self.model, self.layers = model, [(m, name, lin) for block in model.blocks for m in (block.attn, block.mlp)
                                          for name, lin in m.named_children() if isinstance(lin, nn.Linear)]
        model.requires_grad_(False)
        dims = [(lin.in_features, lin.out_features) for *_, lin in self.layers] + [model.tok_emb.weight.shape[::-1]]
        self.layers.append((model, "head_lora", None))  # the tied head: (in, out) is the embedding's (dim, vocab)
        sizes = [(d_in * rank, rank * d_out) for d_in, d_out in dims]
        self.rows, self.slots = rows, torch.zeros(docs, sum(map(sum, sizes)), device=device)
        self.offs, self.params, init, offset = torch.zeros(docs, dtype=torch.int32, device=device), [], [], 0
        gen = torch.Generator().manual_seed(0)
        for (m, name, lin), (d_in, _), (size_a, size_b) in zip(self.layers, dims, sizes):
            a = nn.Parameter(self.slots[:, offset : offset + size_a].view(docs, d_in, rank))
            b = nn.Parameter(self.slots[:, offset + size_a : offset + size_a + size_b].view(docs, rank, -1))
            setattr(m, name, LoRALinear(lin, a, b, self.offs))
            init += [(torch.rand(size_a, generator=gen) * 2 - 1) * d_in**-0.5, torch.zeros(size_b)]
            self.params, offset = self.params + [a, b], offset + size_a + size_b
        self.init = torch.cat(init).to(device)
        self.weights, self.v = self.init.repeat(docs + 1, 1), torch.zeros(docs + 1, offset, device=device)
        self.steps = torch.zeros(docs + 1, 1, device=device)

    def remove(self) -> None:
        for m, name, lin in self.layers:
            setattr(m, name, lin)
        self.model.requires_grad_(True)


def lora_step(model_fn, lora: DocumentLoRA, tokens: torch.Tensor, plan: torch.Tensor, width: int, board: ScoreBoard,
              adapting: bool, lr: float) -> None:
    """One step (plan (S, 7), a step of rank_lora_plan's) on a (lora.rows, width) batch, each window at its offset of
    the flattened batch, the rest token 0 (after the windows: unseen). Scores each window's chunk into board with its
    document's adapter, then, if adapting, takes one Adam step per document on its chunk's mean loss unless it is the
    last: scores come from the forward before that update. Windows in one row never meet (BOS segments)."""
    start, length, score_from, train, _, offset, slot = plan.t().contiguous()
    p = torch.arange(lora.rows * width, device=tokens.device)
    s = (torch.searchsorted(offset, p, right=True) - 1).clamp_min(0)  # the window slot of each flattened position
    i = p - offset[s]
    real = i < length[s]
    pos, scored = torch.where(real, start[s] + i, 0), real & (i >= score_from[s])
    x, y = (torch.where(real, tokens[pos + j], 0).view(lora.rows, width) for j in (0, 1))
    lora.slots.copy_(lora.weights[slot])
    lora.offs.copy_(torch.cat((offset[1:], p[-1:] + 1)))
    with autocast(tokens.device):
        nll = model_fn(x, y, "none", model_fn.segments(x)).float().flatten()
    board.add(pos, nll.detach(), scored)
    on, w, v, n = train.bool()[:, None], lora.slots, lora.v[slot], lora.steps[slot] + 1
    if adapting:  # Adam, beta1 0, bias-corrected beta2; masked: an empty window's gradient is unspecified on GPU
        weight = (scored & on[s, 0]) / torch.zeros_like(train).index_add_(0, s, scored.long()).clamp_min(1)[s]
        g = torch.cat([x.flatten(1) for x in torch.autograd.grad((nll * weight).sum(), lora.params)], 1)
        v = v * LORA_BETA2 + (1 - LORA_BETA2) * g * g
        w = w - lr * g / ((v / (1 - LORA_BETA2**n)).sqrt() + 1e-8)
    lora.weights[slot] = torch.where(on, w, lora.init)  # a document's last chunk (or an empty slot): fresh again
    lora.v[slot], lora.steps[slot] = torch.where(on, v, 0.0), torch.where(on, n, 0.0)


def rank_lora_plan(tokens: torch.Tensor, model: GPT, args: Hyperparameters, rt: Runtime) -> tuple[torch.Tensor, ...]:
    """This rank's TTT work: its consecutive documents (a bool mask over document_spans', balanced across ranks by
    chunk count), up to TTT_LORA_DOCS in flight, in stream order (R6 sorts by length). A step places the next chunk
    of each document in flight, oldest first, then starts documents while the next fits; chunk k of n targets scores
    k*chunk .. min((k+1)*chunk, n)-1 from the latest <= TRAIN_SEQ_LEN tokens. Windows go first-fit into TTT_LORA_ROWS
    rows of TRAIN_SEQ_LEN; one not starting at its document's BOS, or any without the model's doc_mask, takes an
    empty row. Returns (mask, plan (steps, TTT_LORA_DOCS, 7) int64 on CPU: a step's windows in layout order, then
    empty slots: first input position, length (0: empty), first scored offset, 1 if trained on (not a document's last
    chunk), 1 if it starts a document, offset in the flattened rows, adapter slot (TTT_LORA_DOCS: none))."""
    chunk, rows, docs, seq_len = args.ttt_lora_chunk, args.ttt_lora_rows, args.ttt_lora_docs, args.train_seq_len
    starts, lengths = document_spans(tokens, model.bos_id)
    chunks = (lengths + chunk - 1) // chunk
    mine = (chunks.cumsum(0) - chunks) * rt.world_size // chunks.sum() == rt.rank
    share = ((tokens[starts.to(tokens.device)] == model.bos_id).cpu() & model.doc_mask)[mine].tolist()
    starts, lengths, chunks = starts[mine].tolist(), lengths[mine].tolist(), chunks[mine].tolist()
    flying, free, nxt, out = [], list(range(docs))[::-1], 0, []

    def place(d: int, k: int, slot: int) -> bool:  # chunk k of document d, first-fit into this step's rows
        hi = min((k + 1) * chunk, lengths[d])
        w, shared = min(hi, seq_len), hi <= seq_len and share[d]
        r = next((r for r, u in enumerate(used) if (u + w <= seq_len if shared else u == 0)), None)
        if r is not None:
            step.append([starts[d] + hi - w, w, k * chunk - hi + w, int(k < chunks[d] - 1), int(k == 0),
                         r * seq_len + used[r], slot])
            used[r] += w
        return r is not None

    while flying or nxt < len(chunks):
        used, step = [0] * rows, []
        for f in flying:  # [document, its next chunk, adapter slot]
            f[1] += place(*f)
        while nxt < len(chunks) and free and place(nxt, 0, free[-1]):
            flying, nxt = flying + [[nxt, 1, free.pop()]], nxt + 1
        free += [slot for d, k, slot in flying if k == chunks[d]]
        flying = [f for f in flying if f[1] < chunks[f[0]]]
        out.append(sorted(step, key=lambda w: w[5]) + [[0, 0, 0, 0, 0, rows * seq_len, docs]] * (docs - len(step)))
    return mine, torch.tensor(out, dtype=torch.int64).view(-1, docs, 7)


def evaluate_ttt(model: GPT, tokens: torch.Tensor, bytes_per_target: torch.Tensor, args: Hyperparameters, rt: Runtime,
                 log: Logger, deadline: float) -> tuple[float, float, ScoreBoard]:
    """Score-first per-document LoRA TTT (R6 PR #1667 / R7 PR #1530): every target is scored once, before any update
    that used it, and no document's score depends on another (fresh adapters per document, attention and adapters per
    window). Each rank runs its rank_lora_plan by lora_step, compiled first (compiled_blocks) on random tokens, never
    validation tokens. If the projected time passes `deadline` (perf_counter s), adapting stops and the remaining
    steps only score (logged). No collective runs before the final all-reduce."""
    device, rows, docs, width = rt.device, args.ttt_lora_rows, args.ttt_lora_docs, args.train_seq_len
    mine, plan = rank_lora_plan(tokens, model, args, rt)
    plan, steps, board = plan.to(device), len(plan), ScoreBoard(tokens.numel() - 1, device)
    lora = DocumentLoRA(model, rows, docs, args.ttt_lora_rank, device)
    noise = torch.randint(0, model.tok_emb.num_embeddings, (rows * width + 1,), device=device)  # compile warm-up:
    fake = [[r * width, width, 0, 0, 1, r * width, r] for r in range(min(rows, docs))]  # untrained, stays fresh
    fake = torch.tensor(fake + [[0, 0, 0, 0, 0, rows * width, docs]] * (docs - len(fake)), device=device)
    adapting, adapted = True, 0
    try:
        with compiled_blocks(model, device) as model_fn:
            lora_step(model_fn, lora, noise, fake, width, ScoreBoard(rows * width, device), True, args.ttt_lora_lr)
            synchronize(device)
            t0 = time.perf_counter()
            for t in range(steps):
                if adapting and t and t % LORA_CHECK_EVERY == 0:
                    synchronize(device)
                    now = time.perf_counter()
                    if now + (now - t0) / t * (LORA_CHECK_EVERY + LORA_SCORE_COST * (steps - t)) > deadline:
                        adapting = False
                        log(f"ttt_deadline: stopping adaptation after {t} of {steps} steps; the rest are scored "
                            f"without training (EVAL_MAX_SECONDS={args.eval_max_seconds})")
                lora_step(model_fn, lora, tokens, plan[t], width, board, adapting, args.ttt_lora_lr)
                adapted += adapting
            synchronize(device)
    finally:
        lora.remove()
    loss, bpb = board.finalize(bytes_per_target, rt)
    log(f"ttt documents {int(mine.sum())} of {len(mine)} steps {steps} adapted {adapted} rows {rows} docs {docs} "
        f"time {time.perf_counter() - t0:.1f}s")
    return loss, bpb, board


# ---- 9. Main ---------------------------------------------------------------------------------

def check_outputs(args: Hyperparameters, log_path: str) -> None:
    """Pre-flight, before any data is read: create each output's folder, write a scratch file there, require 16 MB free;
    with EVAL_ONLY, refuse a LOG_PATH holding a training log and read the artifact. Raises OSError naming the variable,
    ValueError or FileNotFoundError."""
    outputs = {"LOG_PATH": log_path, "SCORES_PATH": args.scores_path} | (
        {} if args.eval_only else {"ARTIFACT": args.artifact, "SUBMISSION_PATH": args.submission_path})
    for var, path in ((var, path) for var, path in outputs.items() if path):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            if os.path.isdir(path):
                raise IsADirectoryError("it is a folder")
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
            if shutil.disk_usage(folder).free < ARTIFACT_LIMIT_BYTES:
                raise OSError(f"less than {ARTIFACT_LIMIT_BYTES} bytes free")
        except OSError as e:
            raise OSError(f"{var}={path!r} cannot be written: {e}") from None
    if args.eval_only:
        if os.path.isfile(log_path) and "\ntrain_start " in open(log_path, encoding="utf-8", errors="replace").read():
            raise ValueError(f"LOG_PATH={log_path!r} holds a training log, which EVAL_ONLY would overwrite; "
                             "set LOG_PATH to another file")
        if not os.path.isfile(args.artifact):
            raise FileNotFoundError(f"EVAL_ONLY=1 needs an artifact; {args.artifact!r} does not exist (set ARTIFACT)")
        unpack_artifact(open(args.artifact, "rb").read(), args.artifact)


def main() -> int:
    """Check outputs, tokenizer and data; then delete stale outputs, open the log (ending `run_end status=ok|over_limit|
    killed signal=NAME|error ...`) and run. Returns 0, 1 (over a limit) or 128 + signal (killed); errors re-raise."""
    code = open(__file__, "rb").read()
    args, overrides = Hyperparameters.from_env()
    rt = init_runtime()
    attention = select_attention(args, rt.device)  # before any data is read: ATTENTION=flash may stop the run here
    log_path = args.log_path or ("eval_log.txt" if args.eval_only else "train_log.txt")
    check_outputs(args, log_path)
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    val_tokens = load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.train_seq_len,
                                        args.vocab_size)
    check_tokenizer_matches(sp, val_tokens.numpy(), args.tokenizer_path, args.data_path)
    loader, accum = None, 0
    if not args.eval_only:
        accum = grad_accum_steps(args, rt)
        seqs = args.train_batch_tokens // (rt.world_size * accum * args.train_seq_len)
        loader = TokenLoader(os.path.join(args.data_path, "fineweb_train_*.bin"), args.train_seq_len, seqs, rt,
                             args.seed, args.vocab_size)
    for stale in [args.scores_path] + ([] if args.eval_only else [args.submission_path]):
        if rt.is_main and stale and os.path.exists(stale):
            os.remove(stale)  # no earlier run's results may sit beside this run's artifact
    log = Logger(log_path, rt.is_main)
    log_run_header(log, args, overrides, rt, code, attention)
    try:
        status = run(args, rt, log, code, sp, val_tokens, loader, accum)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through interrupt_on_signal
        name = e.args[0] if e.args else "SIGINT"
        log(f"run_end status=killed signal={name}")
        return 128 + signal.Signals[name]
    except BaseException as e:
        log(f"run_end status=error {type(e).__name__}: {e}")
        raise
    log(f"run_end status={'ok' if status == 0 else 'over_limit'}")
    return status


def run(args: Hyperparameters, rt: Runtime, log: Logger, code: bytes, sp: spm.SentencePieceProcessor,
        val_tokens: torch.Tensor, loader: TokenLoader | None, accum: int) -> int:
    """Train (unless EVAL_ONLY), write the artifact, reload and score it, write outputs; 1 if over a limit, else 0."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    bytes_per_target = target_bytes(val_tokens, byte_tables(sp))
    val_tokens = val_tokens.to(rt.device)
    log(f"val_tokens {val_tokens.numel() - 1} val_bytes {int(bytes_per_target.sum())}")
    summary: dict = {"seed": args.seed, "world_size": rt.world_size,
                     "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"}

    def report(label: str, result: tuple, extra: str = "") -> tuple:  # log a final score, keep its bpb for the summary
        log(f"final {label} val_loss {result[0]:.6f} val_bpb {result[1]:.6f}{extra} "
            f"eval_time {time.perf_counter() - t_eval:.1f}s")
        summary[f"{label}_val_bpb"] = round(result[1], 6)
        return result

    train_ok, t_eval = True, time.perf_counter()  # EVAL_ONLY trains nothing: its evaluation clock starts here
    if not args.eval_only:
        config, max_bytes = model_config(args, sp.bos_id()), ARTIFACT_LIMIT_BYTES - 1 - len(code)  # total < limit
        model = GPT(**config).to(rt.device)
        log(f"model_params {sum(p.numel() for p in model.parameters())}")
        budget = args.max_wallclock_seconds - args.gptq_reserve_seconds
        steps, loop_seconds, ema = train(args, model, loader, rt, accum, log, budget)
        t_gptq = time.perf_counter()  # GPTQ reads training data, so it counts as training time
        ema.copy_to_model()
        hessians = collect_hessians(model, loader, args.gptq_calib_batches, rt) if args.gptq_calib_batches else {}
        if rt.is_main:
            groups, small = matrix_groups(model.state_dict(), hessians), quantize_small_tensors(model.state_dict())
            entries, alpha = quantize_to_fit(groups, small, config, max_bytes)
        synchronize(rt.device)
        gptq_seconds = time.perf_counter() - t_gptq
        train_seconds = loop_seconds + gptq_seconds
        train_ok = train_seconds <= args.max_wallclock_seconds
        log(f"gptq hessians {len(hessians)} calib_batches {args.gptq_calib_batches} gptq_time {gptq_seconds:.1f}s "
            f"train_seconds {train_seconds:.1f}s (limit {args.max_wallclock_seconds:g}s "
            f"{'OK' if train_ok else 'OVER'})")
        summary.update(steps=steps, step_ms=round(1000 * loop_seconds / max(steps, 1), 2),
                       train_seconds=round(train_seconds, 1), train_within_limit=train_ok)

        t_eval = time.perf_counter()  # from here on everything counts as evaluation time
        if rt.is_main:
            if len(blob := pack_artifact(config, entries)) > max_bytes:  # quantize_to_fit packed and measured these
                raise RuntimeError(f"artifact of {len(blob)} bytes > {max_bytes}: not written")
            atomic_write(args.artifact, blob)
            log(f"artifact written in {time.perf_counter() - t_eval:.1f}s step_scale {alpha:.4f}")
            del groups, small, entries
        if rt.distributed:
            dist.barrier()
        model_fn = maybe_compile(model, rt.device)  # diagnostic: the float EMA model before quantization
        report("pre_quant", evaluate(model_fn, val_tokens, bytes_per_target, args.train_seq_len, args, rt))
        del model, model_fn, ema, hessians
    deadline = t_eval + args.eval_max_seconds

    bytes_model, bytes_code = os.path.getsize(args.artifact), len(code)
    fits = (bytes_total := bytes_model + bytes_code) < ARTIFACT_LIMIT_BYTES
    log(f"artifact {args.artifact} bytes_model {bytes_model} bytes_code {bytes_code} bytes_total {bytes_total} "
        f"(limit {ARTIFACT_LIMIT_BYTES}: {'OK' if fits else 'OVER THE LIMIT'})")

    model, config = load_artifact_model(args.artifact, rt.device)
    log("artifact_config " + json.dumps(config, sort_keys=True))
    for key in (k for k, v in config.items() if getattr(args, k, v) != v):
        log(f"WARNING: {key.upper()}={getattr(args, key)} differs from the artifact's {config[key]}, which is used")
    if config["vocab_size"] != args.vocab_size or config["max_seq_len"] != args.train_seq_len:
        raise ValueError(f"artifact was built for vocab {config['vocab_size']} / seq_len {config['max_seq_len']}; "
                         "set VOCAB_SIZE and TRAIN_SEQ_LEN to match")
    model_fn = maybe_compile(model, rt.device)
    warm_up_eval_graphs(model, model_fn, args, rt)
    log(f"eval_graphs compiled eval_time {time.perf_counter() - t_eval:.1f}s")
    report("roundtrip", evaluate(model_fn, val_tokens, bytes_per_target, args.train_seq_len, args, rt))
    if args.ttt_enabled:  # TTT scores the sliding windows itself (a plain sliding score: EVAL_ONLY=1 TTT_ENABLED=0)
        final, result = "ttt", evaluate_ttt(model, val_tokens, bytes_per_target, args, rt, log, deadline)
    else:
        final, result = "sliding", evaluate(model_fn, val_tokens, bytes_per_target, args.eval_stride, args, rt)
    loss, bpb, board = report(final, result, f" stride {args.eval_stride}")
    eval_seconds = time.perf_counter() - t_eval
    eval_ok = eval_seconds <= args.eval_max_seconds
    log(f"eval_seconds {eval_seconds:.1f} (limit {args.eval_max_seconds:g}s {'OK' if eval_ok else 'OVER'})")
    log(f"final val_loss {loss:.6f} val_bpb {bpb:.6f} bytes_total {bytes_total}")

    if rt.is_main:
        if not args.eval_only:  # allow_nan=False: a nan/inf score raises instead of writing invalid JSON
            summary = {"name": SUBMISSION_NAME, "val_bpb": round(bpb, 6), "val_loss": round(loss, 6),
                       "bytes_total": bytes_total, "bytes_code": bytes_code, "bytes_model": bytes_model,
                       "eval_seconds": round(eval_seconds, 1), "eval_within_limit": eval_ok, **summary,
                       "date": datetime.date.today().isoformat()}
            atomic_write(args.submission_path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        if args.scores_path:
            np.save(buffer := io.BytesIO(), board.nll.cpu().numpy().astype(np.float32))
            atomic_write(args.scores_path, buffer.getvalue())
    if rt.distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    for ok, message in ((fits, f"artifact is {bytes_total} bytes, not under the {ARTIFACT_LIMIT_BYTES}-byte cap"),
                        (train_ok, f"training took longer than MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds:g}s"),
                        (eval_ok, f"evaluation took longer than EVAL_MAX_SECONDS={args.eval_max_seconds:g}s")):
        if not ok:
            log(f"ERROR: {message}")
    return 0 if fits and train_ok and eval_ok else 1


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt_on_signal)
    sys.exit(main())
