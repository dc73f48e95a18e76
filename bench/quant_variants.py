#!/usr/bin/env python3
"""bench/quant_variants.py: a paired screen of quantizer variants on ONE trained float model. Every variant is fitted
to the same byte budget with train_gpt's own packer (`quantize_to_fit`, `pack_artifact`), its artifact bytes are
unpacked again, and the round trip is scored on non-overlapping TRAIN_SEQ_LEN windows (`evaluate`, stride =
TRAIN_SEQ_LEN), so the only difference between two rows is the quantizer.

    # train once (train_gpt's `train`, its env vars set model/data/schedule), save float model + Hessians, screen:
    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=8192 TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=300 \
    MUON_MOMENTUM_WARMUP_STEPS=750 python3 bench/quant_variants.py --save float_s1337.pt
    # later screens skip training (a minute or so per variant on one GPU):
    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=8192 python3 bench/quant_variants.py --load float_s1337.pt \
        --variants baseline,sdclip,lqer,lqer8,top6

Variants (VARIANTS; `--variants a,b,...`):
  baseline  train_gpt.py as is: clip-search row scales, GPTQ, step scale alpha fitted by quantize_to_fit.
  sdclip    row scales k * std(row) / qmax (R6-R8's SDClip; k 12 for MLP int6, 13 for attention int6, 15 for int7
            embeddings), then the same GPTQ and fit; the printed alpha multiplies those k (1.0 = k as listed).
  lqer      LQER-asym (Zhang et al. 2024, "LQER: Low-Rank Quantization Error Reconstruction for LLMs"; R8 uses rank 4
            on its top-3 matrices): after GPTQ, the rank-4 SVD E ~ A B of E = W - W_hat of the 3 matrices of largest
            Hessian-weighted error, A and B stored as int4 asymmetric codes with fp16 per-row scale and offset; the
            factors are extra artifact entries, so the GPTQ part is refitted to the budget minus their packed bytes.
  lqer8     the same at rank 8;  top6: rank 4 on the top 6 matrices.
  emb_rtn   the tied embedding rounded to nearest instead of GPTQ with the head's Hessian (the former
            bench/quant_embedding.py's second arm).

Smoke-test aids (CPU): --min-numel lowers train_gpt's QUANT_MIN_NUMEL (a tiny model's matrices are below 65,536
values, so nothing would get integer codes), --max-bytes sets a budget the tiny model must be squeezed into."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

FORMAT = "quant_variants-float-1"  # the saved float bundle's tag
SDCLIP_K = {"mlp": 12.0, "attn": 13.0, "int7": 15.0}  # clip = k * std(row) per matrix class (R6-R8 SDClip)
SDCLIP_BASE = 0.25  # sdclip's scales enter quantize_to_fit times this, so its alpha >= 1 can reach k/4
LQER_BITS = 4  # the low-rank factors' asymmetric code width
LQER_TAG = "#lqer_"  # extra entries are named f"{matrix}#lqer_a", "#lqer_a_zero", "#lqer_b", "#lqer_b_zero"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One quantizer: row scales ("clip": train_gpt's clip search, "sdclip": k * std), whether the tied embedding uses
    GPTQ with the head's Hessian, and LQER's rank and number of matrices (0: none)."""

    name: str
    scales: str = "clip"
    emb_gptq: bool = True
    lqer_rank: int = 0
    lqer_top: int = 0


VARIANTS = {v.name: v for v in (
    Variant("baseline"),
    Variant("sdclip", scales="sdclip"),
    Variant("lqer", lqer_rank=4, lqer_top=3),
    Variant("lqer8", lqer_rank=8, lqer_top=3),
    Variant("top6", lqer_rank=4, lqer_top=6),
    Variant("emb_rtn", emb_gptq=False),
)}
DEFAULT_VARIANTS = "baseline,sdclip,lqer"


# ---- SDClip --------------------------------------------------------------------------------------

def sdclip_class(name: str, qmax: int) -> str:
    """SDCLIP_K's key for a large matrix: "int7" (embeddings, qmax 63), "mlp" or "attn" (int6 block matrices).
    ValueError for an int6 matrix that is neither (none in train_gpt's model)."""
    if qmax == tg.INT7_MAX:
        return "int7"
    for key in ("mlp", "attn"):
        if f".{key}." in name:
            return key
    raise ValueError(f"no SDClip class for {name!r} (qmax {qmax})")


def sdclip_scales(w: torch.Tensor, qmax: int, k: float) -> torch.Tensor:
    """SDClip row scales: w (..., rows, cols) fp32 -> k * std(row) / qmax, (..., rows) fp32, fp16-exact, >= 1e-6
    (as choose_row_scales). std is the population one (no Bessel correction), about the row's mean."""
    return (k * w.std(-1, correction=0) / qmax).clamp_min(1e-6).half().float()


def sdclip_groups(groups: list[tg.MatrixGroup], base: float = SDCLIP_BASE) -> list[tg.MatrixGroup]:
    """The same groups with scales base * sdclip_scales(w, qmax, SDCLIP_K[class]) in place of the clip search; every
    group of one class shares k, so quantize_to_fit's alpha moves all classes together (their k ratios stay fixed)."""
    out = []
    for g in groups:
        k = SDCLIP_K[sdclip_class(g.names[0], g.qmax)]
        out.append(dataclasses.replace(g, scale=(base * sdclip_scales(g.w, g.qmax, k)).half().float()))
    return out


# ---- LQER ----------------------------------------------------------------------------------------

def quantize_asym(x: torch.Tensor, bits: int = LQER_BITS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric quantization: x (rows, cols) -> (codes int8 (rows, cols) in [0, 2^bits - 1], scale fp16
    (rows,), offset fp16 (rows,)), x ~ codes * scale + offset with offset = the row's minimum and scale = range /
    (2^bits - 1), both rounded to fp16 before the codes are chosen. A row whose fp16 scale is 0 (constant, or a range
    below fp16's smallest subnormal) gets scale 1 and codes 0."""
    levels = 2**bits - 1
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    zero = lo.half()
    scale = ((hi - lo) / levels).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - zero.float()[:, None]) / scale.float()[:, None]).round().clamp(0, levels).to(torch.int8)
    return codes, scale, zero


def dequantize_asym(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_asym (up to rounding): codes (rows, cols), scale and offset (rows,) -> fp32 (rows, cols)."""
    return codes.float() * scale.float()[:, None] + zero.float()[:, None]


def quant_error(e: torch.Tensor, h: torch.Tensor | None) -> float:
    """LQER's ranking measure of an error e = W - W_hat (rows, cols): trace(e H e^T) with the input Hessian H (cols,
    cols), the mean squared output error per token, where one exists, else ||e||_F^2 (H = I). The two are not in the
    same units: the one Hessian-less matrix, the bigram table, is a lookup whose rows then go through a projection
    (ranked by ||e||_F^2 it took one of lqer's 3 slots on P300 and lost 5 % of its error; branch next7 skips it)."""
    e = e.float()
    return float(((e @ h.to(e)) * e).sum()) if h is not None else float(e.square().sum())


def lqer_entries(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], entries: dict[str, dict],
                 rank: int, top: int) -> tuple[dict[str, dict], list[tuple[str, float, float]]]:
    """LQER-asym (Zhang et al. 2024) on the `top` int6/int7 entries of largest quant_error: E = W - W_hat ~ A B by the
    rank-`rank` SVD (A = U_r S_r (rows, r), B = V_r^T (r, cols)), each factor quantize_asym'd per row to int4 codes.
    -> (extra entries, [(name, error before, error after), ...] chosen, largest first; both errors by quant_error, the
    latter of W - (W_hat + A_hat B_hat)). The extra entries go through pack_artifact like
    any other: codes as an int entry (kind "int6"; the rANS coder only sees their histogram) whose "scale" is the fp16
    row scale, the fp16 row offsets as "fp16" entries; apply_lqer reads them back."""
    coded = {n: e for n, e in entries.items() if e["kind"] in tg.INT_KINDS.values()}
    errs = {n: state[n].float().to(w.device) - w for n, w in tg.dequantize_entries(coded).items()}  # E = W - W_hat
    chosen = sorted(((n, quant_error(err, hessians.get(n))) for n, err in errs.items()), key=lambda t: -t[1])[:top]
    extra, report = {}, []
    for name, before in chosen:
        err = errs[name]
        u, s, vh = torch.linalg.svd(err, full_matrices=False)
        r = min(rank, s.numel())
        factors = []
        for tag, factor in (("a", u[:, :r] * s[:r]), ("b", vh[:r])):
            codes, scale, zero = quantize_asym(factor)
            extra[f"{name}{LQER_TAG}{tag}"] = {"kind": tg.INT_KINDS[tg.INT6_MAX], "q": codes, "scale": scale}
            extra[f"{name}{LQER_TAG}{tag}_zero"] = {"kind": "fp16", "data": zero}
            factors.append(dequantize_asym(codes, scale, zero))
        report.append((name, before, quant_error(err - factors[0] @ factors[1], hessians.get(name))))
    return extra, report


def split_entries(entries: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(the model's entries, LQER's extra entries), by name."""
    model = {n: e for n, e in entries.items() if LQER_TAG not in n}
    return model, {n: e for n, e in entries.items() if LQER_TAG in n}


def apply_lqer(weights: dict[str, torch.Tensor], extra: dict[str, dict]) -> dict[str, torch.Tensor]:
    """W' = W_hat + A_hat B_hat for every matrix with LQER entries: weights {name: W_hat fp32} (dequantize_entries'),
    extra lqer_entries' (or unpacked) -> a new dict. KeyError if a factor's offset or partner entry is missing."""
    out = dict(weights)
    for key in (k for k in extra if k.endswith(f"{LQER_TAG}a")):
        name = key[: -len(f"{LQER_TAG}a")]
        a, b = (dequantize_asym(extra[f"{name}{LQER_TAG}{t}"]["q"], extra[f"{name}{LQER_TAG}{t}"]["scale"],
                                extra[f"{name}{LQER_TAG}{t}_zero"]["data"]) for t in ("a", "b"))
        out[name] = out[name].float() + (a @ b).to(out[name].device)
    return out


def roundtrip_weights(blob: bytes) -> dict[str, torch.Tensor]:
    """The artifact's weights as a fresh model would load them: unpack_artifact, dequantize_entries, then apply_lqer
    for any LQER entries -> {state name: fp32 tensor} (CPU). ValueError as unpack_artifact."""
    _, entries = tg.unpack_artifact(blob, "variant artifact")
    model, extra = split_entries(entries)
    return apply_lqer(tg.dequantize_entries(model), extra)


# ---- fitting a variant to the budget ---------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """One variant's artifact: blob (the packed bytes, <= max_bytes), alpha (its step scale; for sdclip the factor on
    SDCLIP_K), fit_seconds (grouping + fitting + LQER, cached steps counted as if run), chosen LQER matrices with their
    quant_error before and after the correction, and fit_budget, the budget given to quantize_to_fit (max_bytes less
    the LQER entries' packed bytes)."""

    name: str
    blob: bytes
    alpha: float
    fit_seconds: float
    chosen: list[tuple[str, float, float]]
    fit_budget: int


class Screen:
    """One float model (state {name: fp32}, hessians {name: (cols, cols)}), its config and a byte budget; caches the
    groups and fits that variants share (baseline's fit at max_bytes is lqer's first step)."""

    def __init__(self, state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], config: dict,
                 max_bytes: int, tolerance: float = 5e-4):
        self.state, self.hessians, self.config = state, hessians, config
        self.max_bytes, self.tolerance = max_bytes, tolerance
        self._groups: dict[tuple, tuple] = {}
        self._fits: dict[tuple, tuple] = {}

    def groups(self, v: Variant) -> tuple[list[tg.MatrixGroup], dict[str, dict], float]:
        """(groups, small-tensor entries, seconds to build them) for the variant's scales and embedding Hessian."""
        key = (v.scales, v.emb_gptq)
        if key not in self._groups:
            t = time.perf_counter()
            hessians = {k: h for k, h in self.hessians.items() if v.emb_gptq or k != "tok_emb.weight"}
            groups = tg.matrix_groups(self.state, hessians)
            if v.scales == "sdclip":
                groups = sdclip_groups(groups)
            elif v.scales != "clip":
                raise ValueError(f"unknown scales {v.scales!r}")
            self._groups[key] = groups, tg.quantize_small_tensors(self.state), time.perf_counter() - t
        return self._groups[key]

    def fit(self, v: Variant, budget: int) -> tuple[dict[str, dict], float, float]:
        """quantize_to_fit(groups, small, config, budget) -> (entries, alpha, seconds incl. the groups')."""
        key = (v.scales, v.emb_gptq, budget)
        if key not in self._fits:
            groups, small, group_s = self.groups(v)
            t = time.perf_counter()
            entries, alpha = tg.quantize_to_fit(groups, small, self.config, budget, self.tolerance)
            self._fits[key] = entries, alpha, group_s + time.perf_counter() - t
        return self._fits[key]

    def run(self, v: Variant) -> Result:
        """Fit variant v to max_bytes. With LQER: fit at max_bytes, measure the packed bytes its extra entries add,
        refit at max_bytes minus those, and shrink by any overshoot until the whole artifact fits (4 tries, else
        ValueError). The returned blob is what was measured: pack_artifact of the model's and LQER's entries."""
        scale_alpha = SDCLIP_BASE if v.scales == "sdclip" else 1.0
        if not v.lqer_rank:
            entries, alpha, seconds = self.fit(v, self.max_bytes)
            return Result(v.name, tg.pack_artifact(self.config, entries), alpha * scale_alpha, seconds, [],
                          self.max_bytes)
        budget, seconds = self.max_bytes, 0.0
        for _ in range(4):
            entries, alpha, fit_s = self.fit(v, budget)
            t = time.perf_counter()
            extra, chosen = lqer_entries(self.state, self.hessians, entries, v.lqer_rank, v.lqer_top)
            blob = tg.pack_artifact(self.config, {**entries, **extra})
            seconds += fit_s + time.perf_counter() - t
            if len(blob) <= self.max_bytes:
                return Result(v.name, blob, alpha * scale_alpha, seconds, chosen, budget)
            if budget == self.max_bytes:  # first try: give the GPTQ part the budget less the factors' packed bytes
                budget -= len(blob) - len(tg.pack_artifact(self.config, entries))
            else:
                budget -= len(blob) - self.max_bytes
        raise ValueError(f"{v.name}: could not fit the LQER entries into {self.max_bytes} bytes")


# ---- the float model: train or load ---------------------------------------------------------------

def save_float(path: str, state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], config: dict,
               meta: dict) -> None:
    """torch.save {format, config, state, hessians, meta} (tensors moved to CPU) to `path` atomically
    (tg.atomic_write). meta: plain values only (it is read back with weights_only=True). OSError as atomic_write."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "config": config, "meta": meta,
                "state": {k: v.detach().cpu().clone() for k, v in state.items()},
                "hessians": {k: v.detach().cpu().clone() for k, v in hessians.items()}}, buffer)
    tg.atomic_write(path, buffer.getvalue())


def load_float(path: str) -> dict:
    """Inverse of save_float -> {"format", "config", "state", "hessians", "meta"} (CPU tensors). ValueError if the
    file is not such a bundle; FileNotFoundError if it does not exist."""
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bench/quant_variants.py float bundle ({FORMAT})")
    return bundle


def train_float(args: tg.Hyperparameters, rt: tg.Runtime, log: tg.Logger, config: dict
                ) -> tuple[tg.GPT, dict[str, torch.Tensor], dict]:
    """train_gpt's training (same model, loader, schedule and GPTQ reserve) -> (EMA model, Hessians, meta)."""
    model = tg.GPT(**config).to(rt.device)
    accum = tg.grad_accum_steps(args, rt)
    loader = tg.TokenLoader(os.path.join(args.data_path, "fineweb_train_*.bin"), args.train_seq_len,
                            args.train_batch_tokens // (accum * args.train_seq_len), rt, args.seed, args.vocab_size)
    steps, loop_s, ema = tg.train(args, model, loader, rt, accum, log,
                                  args.max_wallclock_seconds - args.gptq_reserve_seconds)
    ema.copy_to_model()
    hessians = tg.collect_hessians(model, loader, args.gptq_calib_batches, rt) if args.gptq_calib_batches else {}
    return model, hessians, {"steps": steps, "loop_seconds": round(loop_s, 1)}


# ---- report --------------------------------------------------------------------------------------

def table(rows: list[dict], float_bpb: float) -> list[str]:
    """Lines of the result table: one per row {name, alpha, bytes, fit_s, loss, bpb}; d_bpb against baseline's (when
    screened, else "-"), gap against the float model's bpb."""
    base = next((r["bpb"] for r in rows if r["name"] == "baseline"), None)
    lines = [f"{'variant':<10} {'alpha':>7} {'bytes':>11} {'fit_s':>6} {'val_loss':>9} {'val_bpb':>9} "
             f"{'d_bpb':>9} {'gap':>8}"]
    for r in rows:
        delta = f"{r['bpb'] - base:+.6f}" if base is not None else "-"
        lines.append(f"{r['name']:<10} {r['alpha']:7.4f} {r['bytes']:11d} {r['fit_s']:6.1f} {r['loss']:9.6f} "
                     f"{r['bpb']:9.6f} {delta:>9} {r['bpb'] - float_bpb:+8.5f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, get the float model (train, or --load), score it, run and score each variant, print the table
    and a summary line (also to LOG_PATH, default quant_variants.txt). Returns 0; errors raise."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--save", metavar="PATH", help="train, then save the float EMA model + Hessians + config here")
    src.add_argument("--load", metavar="PATH", help="skip training: read a float bundle written by --save")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}; '' only trains/saves)")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="artifact budget (default: train_gpt's, 16,000,000 - 1 - len(train_gpt.py))")
    p.add_argument("--tolerance", type=float, default=5e-4, help="quantize_to_fit's fit tolerance (default 5e-4)")
    p.add_argument("--min-numel", type=int, default=0,
                   help="smoke-test aid: set train_gpt's QUANT_MIN_NUMEL (tiny models' matrices are below 65,536)")
    a = p.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    if bad := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if a.min_numel:
        tg.QUANT_MIN_NUMEL = a.min_numel

    args, overrides = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    if rt.distributed:
        raise SystemExit("bench/quant_variants.py runs in one process (one GPU)")
    attention = tg.select_attention(args, rt.device)
    code = open(tg.__file__, "rb").read()
    log = tg.Logger(args.log_path or "quant_variants.txt", True)
    tg.log_run_header(log, args, overrides, rt, code, attention)
    log(f"bench quant_variants {' '.join(sys.argv[1:] if argv is None else argv)}")
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    val = tg.load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.train_seq_len,
                                    args.vocab_size)
    tg.check_tokenizer_matches(sp, val.numpy(), args.tokenizer_path, args.data_path)
    bytes_per_target, val = tg.target_bytes(val, tg.byte_tables(sp)), val.to(rt.device)

    if a.load:
        bundle = load_float(a.load)
        config, meta = bundle["config"], bundle["meta"]
        if config["vocab_size"] != args.vocab_size or config["max_seq_len"] != args.train_seq_len:
            raise ValueError(f"{a.load} was trained with vocab {config['vocab_size']} / seq_len "
                             f"{config['max_seq_len']}; set VOCAB_SIZE and TRAIN_SEQ_LEN to match")
        if meta.get("code_sha256") != hashlib.sha256(code).hexdigest():
            log(f"WARNING: {a.load} was trained by train_gpt.py {str(meta.get('code_sha256'))[:8]}, not this one")
        model = tg.GPT(**config).to(rt.device)
        model.load_state_dict(bundle["state"], strict=True)
        hessians = {k: h.to(rt.device) for k, h in bundle["hessians"].items()}
        log(f"loaded {a.load}: {len(bundle['state'])} tensors, {len(hessians)} hessians, meta {meta}")
    else:
        torch.manual_seed(args.seed)
        config = tg.model_config(args, sp.bos_id())
        model, hessians, meta = train_float(args, rt, log, config)
        meta.update(code_sha256=hashlib.sha256(code).hexdigest(), seed=args.seed, overrides=overrides)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # model's weights get overwritten below
    model_fn = tg.maybe_compile(model, rt.device)

    def score() -> tuple[float, float]:
        loss, bpb, _ = tg.evaluate(model_fn, val, bytes_per_target, args.train_seq_len, args, rt)
        return loss, bpb

    float_loss, float_bpb = score()
    log(f"float val_loss {float_loss:.6f} val_bpb {float_bpb:.6f} (non-overlapping {args.train_seq_len}-token windows)")
    if a.save:
        meta.update(float_val_loss=float_loss, float_val_bpb=float_bpb)
        save_float(a.save, state, hessians, config, meta)
        log(f"saved {a.save} ({os.path.getsize(a.save)} bytes)")

    max_bytes = a.max_bytes or tg.ARTIFACT_LIMIT_BYTES - 1 - len(code)
    log(f"max_bytes {max_bytes} quant_min_numel {tg.QUANT_MIN_NUMEL} tolerance {a.tolerance:g} variants {names}")
    screen, rows = Screen(state, hessians, config, max_bytes, a.tolerance), []
    for name in names:
        res = screen.run(VARIANTS[name])
        model.load_state_dict(roundtrip_weights(res.blob), strict=True)
        loss, bpb = score()
        rows.append(dict(name=name, alpha=res.alpha, bytes=len(res.blob), fit_s=res.fit_seconds, loss=loss, bpb=bpb))
        chosen = ("; lqer error before->after: " + ", ".join(f"{n} {e0:.4g}->{e1:.4g}" for n, e0, e1 in res.chosen)
                  if res.chosen else "")
        log(f"variant {name} step_scale {res.alpha:.4f} bytes {len(res.blob)} fit_budget {res.fit_budget} "
            f"fit_s {res.fit_seconds:.1f} val_loss {loss:.6f} val_bpb {bpb:.6f}{chosen}")
    if rows:
        for line in table(rows, float_bpb):
            log(line)
        best = min(rows, key=lambda r: r["bpb"])
        base = next((r for r in rows if r["name"] == "baseline"), None)
        log(f"summary float {float_bpb:.6f}; " + (f"baseline {base['bpb']:.6f}; " if base else "")
            + f"best {best['name']} {best['bpb']:.6f}"
            + (f" ({best['bpb'] - base['bpb']:+.6f} vs baseline)" if base else "")
            + f"; all {len(rows)} artifacts <= {max_bytes} bytes: {all(r['bytes'] <= max_bytes for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
