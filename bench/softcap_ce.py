#!/usr/bin/env python3
"""bench/softcap_ce.py: time and check the tied head + logit soft-cap + cross-entropy of train_gpt.py on its own.

GPT.forward ends (train_gpt.py, `GPT.forward`) with

    logits = F.linear(x, tok_emb.weight.to(bf16))                  # x: (B, T, 512) bf16, after the final RMS norm
    logits = softcap * torch.tanh(logits.float() / softcap)        # softcap 30
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())

and at 98,304 tokens per GPU and vocab 8192 its fp32 logits alone are 3.2 GB. This script measures, for each variant
below, the median milliseconds of forward and of forward+backward (CUDA events, after warm-up) and the peak memory
allocated above the inputs (x bf16 and the fp32 master weight, both requiring grad; the gradients are freed before
each call, so the peak includes them), then checks the loss and both gradients against variant `compiled` (and,
unless --no-gold, against an fp32 eager computation of the same function from the same bf16 inputs).

Variants (--variants a,b,...; default all):
  eager               the lines above, eager.
  compiled            the same function under torch.compile(dynamic=False), as train_gpt's `maybe_compile` (the
                      reference of the diff columns; in training the head is part of the whole model's graph).
  compiled_fullgraph  the same with fullgraph=True.
  liger               Liger Kernel's fused linear cross-entropy (`liger_fused_linear_cross_entropy`, softcap=30):
                      chunks of tokens, each chunk's bf16 logits -> a Triton kernel that soft-caps in fp32, computes
                      the loss and writes dlogits in place; dx and dW are computed during the forward (the backward
                      only scales them). Weight cast to bf16 first; dW accumulated over the chunks in bf16 (its
                      default accum_dtype=None).
  liger_f32acc        the same with accum_dtype=torch.float32 (dW accumulated in fp32).
  liger_amp           the fp32 master weight passed as is under torch.autocast(bf16): Liger's matmuls run in bf16
                      and dW is accumulated in fp32 (addmm out_dtype=float32), no separate cast.
  chunked             plain torch (`chunked_softcap_ce`): the same chunk-and-compute-gradients-in-forward idea, the
                      per-chunk soft-cap + log-softmax + dlogits compiled by torch.compile, dW accumulated in fp32.

Liger rows print the reason they are skipped where liger_kernel/triton/CUDA is absent. liger-kernel 0.8.5 declares
only torch and triton (its Requires-Dist) but also imports `packaging` (liger_kernel/ops/utils.py), which torch does
not pull in; both wheels are pure Python (py3-none-any) and kept in the ignored folder .whl-liger/.

    # GPU (defaults: 98,304 tokens = 48 x 2048, dim 512, vocab 8192, softcap 30):
    pip install --no-deps --target /tmp/site .whl-liger/*.whl && PYTHONPATH=/tmp/site python3 bench/softcap_ce.py
    # CPU smoke test (tiny shapes; Liger skipped; timings meaningless):
    python3 bench/softcap_ce.py --tokens 256 --vocab 64 --device cpu --iters 3 --warmup 1

x is N(0, 1) per value (an RMS-normed hidden state), the weight N(0, --weight-std^2) (0.3: logits of std ~7, so a
few reach the cap region), targets uniform: the timings do not depend on the values, the diffs do a little."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

# as train_gpt.py: oneDNN's AMX bf16 kernels die with SIGILL on virtual machines that advertise AMX without enabling it
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """train_gpt.GPT.forward's tail: tied head, tanh soft-cap in fp32, mean cross-entropy. x (B, T, D), weight (V, D),
    targets (B, T) -> scalar."""
    logits = F.linear(x, weight.to(x.dtype))
    logits = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def softcap_ce_chunk(logits: torch.Tensor, targets: torch.Tensor, softcap: float, scale: float):
    """One chunk of soft-capped cross-entropy, loss and gradient together: logits (n, V) (bf16), targets (n,) ->
    (sum of the n NLLs in fp32, scale * dNLL/dlogits in logits' dtype). The soft-cap, softmax and the chain rule
    through tanh run in fp32; the target's term is formed before the rounding, as in the reference's backward."""
    t = torch.tanh(logits.float() / softcap)
    z = softcap * t
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    hit = torch.arange(z.size(-1), device=z.device) == targets[:, None]
    nll = (lse.squeeze(-1) - (z * hit).sum(-1)).sum()
    dz = torch.exp(z - lse) - hit.float()
    return nll, (dz * (1.0 - t * t) * scale).to(logits.dtype)


class ChunkedSoftcapCE(torch.autograd.Function):
    """mean soft-capped cross-entropy of x @ weight.T over chunks of `chunk` tokens, never holding more than one
    chunk's logits: each chunk's dx and dW are computed in the forward (as Liger's fused linear cross-entropy does),
    the backward only scales them by the incoming gradient. dW is accumulated in fp32 and returned in weight's
    dtype (the fp32 master weight needs no bf16 rounding of its gradient)."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk, chunk_fn):
        shape, x2, tgt = x.shape, x.reshape(-1, x.size(-1)), targets.reshape(-1)
        w = weight.to(x.dtype)
        n = x2.size(0)
        gx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, n, chunk):
            xc = x2[s : s + chunk]
            nll, g = chunk_fn(xc @ w.t(), tgt[s : s + chunk], softcap, 1.0 / n)
            total += nll
            if gx is not None:
                torch.mm(g, w, out=gx[s : s + chunk])
            if gw is not None:
                if gw.is_cuda:  # fp32 accumulation straight from the bf16 product (no (V, D) fp32 temporary)
                    torch.addmm(gw, g.t(), xc, out_dtype=torch.float32, out=gw)
                else:  # CPU has no addmm out_dtype
                    gw += (g.t() @ xc).float()
        ctx.shape, ctx.weight_dtype = shape, weight.dtype
        ctx.save_for_backward(gx, gw)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        dx = None if gx is None else (gx * grad.to(gx.dtype)).view(ctx.shape)
        dw = None if gw is None else (gw * grad).to(ctx.weight_dtype)
        return dx, dw, None, None, None, None


def chunked_softcap_ce(x, weight, targets, softcap: float, chunk: int = 8192, chunk_fn=softcap_ce_chunk):
    """`head_loss` computed chunk by chunk (ChunkedSoftcapCE); chunk_fn: softcap_ce_chunk, or it compiled."""
    return ChunkedSoftcapCE.apply(x, weight, targets, softcap, chunk, chunk_fn)


def load_liger(device: torch.device):
    """liger_kernel's functional fused linear cross-entropy, or (None, why not)."""
    if device.type != "cuda":
        return None, "Liger's kernels are Triton (CUDA); device is " + device.type
    try:
        import triton  # noqa: F401
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # ImportError, or triton failing to find a GPU
        return None, f"liger_kernel not importable: {type(e).__name__}: {e}"
    return liger_fused_linear_cross_entropy, None


def build_variants(a, device: torch.device) -> dict:
    """name -> callable(x, weight, targets) -> loss, or a string saying why the variant is unavailable."""
    cap = a.softcap

    def ref(x, w, t):
        return head_loss(x, w, t, cap)

    def compiled(**kw):  # a fresh function each, so the two compiled variants share no Dynamo cache entry
        return torch.compile(lambda x, w, t: head_loss(x, w, t, cap), dynamic=False, **kw) if not a.no_compile \
            else "--no-compile"

    out = {"eager": ref, "compiled": compiled(), "compiled_fullgraph": compiled(fullgraph=True)}
    flce, why = load_liger(device)
    if flce is None:
        out.update(liger=why, liger_f32acc=why, liger_amp=why)
    else:
        import liger_kernel
        extra = {} if a.liger_mem_const == 1 else {"chunk_mem_const": a.liger_mem_const}

        def liger(x, w, t, accum_dtype=None, amp=False):
            x2, t2 = x.reshape(-1, x.size(-1)), t.reshape(-1)
            if amp:  # fp32 weight; Liger's matmuls autocast to bf16, dW accumulates in fp32
                with torch.autocast(device.type, dtype=x.dtype):
                    return flce(x2, w, t2, softcap=cap, **extra)
            return flce(x2, w.to(x.dtype), t2, softcap=cap, accum_dtype=accum_dtype, **extra)

        out["liger"] = liger
        out["liger_f32acc"] = lambda x, w, t: liger(x, w, t, accum_dtype=torch.float32)
        out["liger_amp"] = lambda x, w, t: liger(x, w, t, amp=True)
        print(f"liger_kernel {getattr(liger_kernel, '__version__', '?')} from {liger_kernel.__file__}")
    chunk_fn = softcap_ce_chunk if a.no_compile else torch.compile(softcap_ce_chunk, dynamic=False)
    out["chunked"] = lambda x, w, t: chunked_softcap_ce(x, w, t, cap, a.chunk, chunk_fn)
    return out


def run_once(fn, x, w, t):
    """(loss, dx, dw) of one forward+backward from cleared gradients."""
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()
    return loss.detach().float(), x.grad, w.grad


def timed(fn, x, w, t, warmup: int, iters: int, device: torch.device):
    """(median forward ms, median forward+backward ms, peak GB allocated above the inputs or nan on CPU)."""
    for _ in range(warmup):
        run_once(fn, x, w, t)
    x.grad = w.grad = None
    fwd, total = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
        for e0, e1, e2 in events:
            x.grad = w.grad = None
            e0.record()
            loss = fn(x, w, t)
            e1.record()
            loss.backward()
            e2.record()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        fwd = [e0.elapsed_time(e1) for e0, e1, _ in events]
        total = [e0.elapsed_time(e2) for e0, _, e2 in events]
    else:
        peak = math.nan
        for _ in range(iters):
            x.grad = w.grad = None
            t0 = time.perf_counter()
            loss = fn(x, w, t)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append(1e3 * (t1 - t0))
            total.append(1e3 * (t2 - t0))
    x.grad = w.grad = None
    return statistics.median(fwd), statistics.median(total), peak


def diffs(got, ref) -> tuple[float, float, float, float, float]:
    """(|loss diff|, dx max abs diff, dx relative L2 diff, dW max abs diff, dW relative L2 diff)."""
    out = [abs(got[0] - ref[0]).item()]
    for g, r in zip(got[1:], ref[1:]):
        d = g.float() - r.float()
        out += [d.abs().max().item(), (d.norm() / r.float().norm().clamp_min(1e-30)).item()]
    return tuple(out)


def main() -> None:
    """Parse options, build x, weight and targets, time and check each variant, print the two tables. Unknown variants
    or --tokens not a multiple of --seq: argparse error (exit 2); a failing variant is reported and skipped."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=98_304, help="tokens per call (train_gpt: 98,304 per GPU)")
    ap.add_argument("--seq", type=int, default=2048, help="x is (tokens // seq, seq, dim)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--softcap", type=float, default=30.0)
    ap.add_argument("--weight-std", type=float, default=0.3)
    ap.add_argument("--chunk", type=int, default=8192, help="tokens per chunk of variant chunked")
    ap.add_argument("--liger-mem-const", type=int, default=1,
                    help="Liger's chunk_mem_const (chunk ~ tokens * mem_const * dim / vocab; 1 = its default)")
    ap.add_argument("--variants", default="eager,compiled,compiled_fullgraph,liger,liger_f32acc,liger_amp,chunked")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (compiled rows n/a, chunked eager)")
    ap.add_argument("--no-gold", action="store_true", help="skip the fp32 eager comparison")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    device = torch.device(a.device)
    seq = min(a.seq, a.tokens)
    if a.tokens % seq:
        ap.error(f"--tokens {a.tokens} is not a multiple of --seq {seq}")
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    x = torch.randn(a.tokens // seq, seq, a.dim, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (a.weight_std * torch.randn(a.vocab, a.dim, generator=gen)).to(device).requires_grad_()
    t = torch.randint(0, a.vocab, (a.tokens // seq, seq), generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}: x {tuple(x.shape)} bf16, weight ({a.vocab}, {a.dim}) fp32, "
          f"softcap {a.softcap:g}; fp32 logits would be {a.tokens * a.vocab * 4 / 1e9:.2f} GB")

    variants = build_variants(a, device)
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(variants)}")
    ref_name = "compiled" if callable(variants["compiled"]) else "eager"
    ref = run_once(variants[ref_name], x, w, t)
    ref = (ref[0], ref[1].clone(), ref[2].clone())
    gold = None
    if not a.no_gold:
        xg, wg = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
        loss = head_loss(xg, wg, t, a.softcap)
        loss.backward()
        gold = (loss.detach(), xg.grad, wg.grad)
        del xg, wg, loss

    rows, skipped = [], []
    for n in names:
        fn = variants[n]
        if not callable(fn):
            skipped.append((n, fn))
            continue
        try:
            got = run_once(fn, x, w, t)
            d_ref = diffs(got, ref)
            d_gold = diffs(got, gold) if gold is not None else None
            del got
            x.grad = w.grad = None
            f_ms, fb_ms, peak = timed(fn, x, w, t, a.warmup, a.iters, device)
        except Exception as e:  # e.g. fullgraph refusing a graph break; report and go on
            skipped.append((n, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            x.grad = w.grad = None
            continue
        rows.append((n, f_ms, fb_ms, peak, d_ref, d_gold))

    print(f"\nmedian of {a.iters} after {a.warmup} warm-up; peak = max allocated above the inputs (incl. grads); "
          f"diffs vs {ref_name}: |loss|, max abs (relative L2) of dx and dW")
    print(f"{'variant':<20}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GB':>9}{'loss diff':>11}"
          f"{'dx maxabs (relL2)':>24}{'dW maxabs (relL2)':>24}")
    for n, f_ms, fb_ms, peak, d, _ in rows:
        print(f"{n:<20}{f_ms:>9.3f}{fb_ms:>12.3f}{peak:>9.3f}{d[0]:>11.2e}"
              f"{f'{d[1]:.2e} ({d[2]:.2e})':>24}{f'{d[3]:.2e} ({d[4]:.2e})':>24}")
    for n, why in skipped:
        print(f"{n:<20}n/a: {why}")
    if gold is not None:
        print(f"\nerror vs fp32 eager from the same bf16 x (loss {gold[0].item():.6f}): |loss|, relative L2 of dx, dW")
        for n, *_, g in rows:
            print(f"{n:<20}{g[0]:>11.2e}{g[2]:>11.2e}{g[4]:>11.2e}")


if __name__ == "__main__":
    main()
