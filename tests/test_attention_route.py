"""ATTENTION: FlashAttention where it is installed, runs and measured faster, PyTorch otherwise (select_attention).
On CPU: the selection logic with the flash packages absent or broken, and the FA4 op (`tg.flash4`: shapes, fake
tensors, autograd, torch.compile) around a PyTorch stand-in for FA4's kernels. On a GPU with FlashAttention
installed: the real kernels against SDPA."""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import sys
import types

import pytest
import torch

from conftest import BOS, docs_tokens, runtime, tg, tiny_model

CUDA = torch.device("cuda")  # on a CPU machine only named: these selections fail before they touch it
FLASH_MODULES = ("flash_attn_interface", "flash_attn", "flash_attn.cute", "flash_attn.cute.interface")


@pytest.fixture(autouse=True)
def fresh_routes(monkeypatch):
    """Each test starts on PyTorch's routes, and none leaves FlashAttention routed for the tests after it."""
    monkeypatch.setattr(tg, "ATTENTION_ROUTES", {"dense": None, "varlen": None})


def settings(attention: str) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({"ATTENTION": attention})[0]


@pytest.fixture
def no_flash(monkeypatch):
    """No flash package importable, whatever is installed here."""
    for name in FLASH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ModuleNotFoundError


@pytest.fixture
def h100(monkeypatch, no_flash):
    """This machine says it is an H100 (FLASH_FASTER lists it), and has no flash package."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


def test_invalid_setting_rejected():
    with pytest.raises(ValueError, match="ATTENTION must be auto, flash or sdpa"):
        settings("flash3")


def test_cpu_routes_to_pytorch():
    assert tg.select_attention(settings("auto"), torch.device("cpu")) == "dense=sdpa varlen=sdpa(mask)"
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


def test_auto_without_package_falls_back_with_reason(h100):
    line = tg.select_attention(settings("auto"), CUDA)
    assert line.startswith("dense=sdpa varlen=")
    assert "FlashAttention not used: ModuleNotFoundError" in line and "flash_attn" in line
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


def test_auto_with_broken_package_falls_back_with_reason(h100, monkeypatch):
    """An import that fails otherwise than 'not installed' (here a missing CUDA library) is a reason, not a crash."""

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("flash_attn"):
                raise OSError("libcuda.so.1: cannot open shared object file")

    for name in FLASH_MODULES[1:]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    line = tg.select_attention(settings("auto"), CUDA)
    assert "FlashAttention not used: OSError: libcuda.so.1" in line
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


@pytest.mark.parametrize("attention", ["auto", "flash"])
def test_failed_smoke_call_unroutes(h100, monkeypatch, attention):
    """FlashAttention that imports but fails its smoke call (here FA4 whose kernel raises; on a CPU machine the
    "cuda" tensors fail first) leaves PyTorch routed: auto logs why, flash raises."""

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface",
                        types.SimpleNamespace(_flash_attn_fwd=broken, _flash_attn_bwd=broken))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.0.0b36")
    if attention == "flash":
        with pytest.raises(RuntimeError, match="ATTENTION=flash, but FlashAttention does not work here"):
            tg.select_attention(settings(attention), CUDA)
    else:
        assert "(FlashAttention not used: " in tg.select_attention(settings(attention), CUDA)
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


def test_auto_skips_gpus_where_flash_was_not_faster(monkeypatch):
    """A GPU missing from FLASH_FASTER stays on PyTorch without importing anything."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail(f"imported {name}"))
    varlen = "torch varlen_attn" if tg.varlen_attn is not None else "sdpa(mask)"
    assert tg.select_attention(settings("auto"), CUDA) == f"dense=sdpa varlen={varlen}"


def test_flash_without_package_is_a_clear_error(h100):
    with pytest.raises(RuntimeError, match=r"ATTENTION=flash.*ModuleNotFoundError.*pip install -r requirements-gpu"):
        tg.select_attention(settings("flash"), CUDA)


def test_flash_on_cpu_is_a_clear_error(no_flash):
    with pytest.raises(RuntimeError, match=r"ATTENTION=flash, but FlashAttention does not work here.*a CUDA GPU"):
        tg.select_attention(settings("flash"), torch.device("cpu"))
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


def test_sdpa_never_imports_flash(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail(f"imported {name}"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert tg.select_attention(settings("sdpa"), CUDA).startswith("dense=sdpa varlen=")
    assert tg.ATTENTION_ROUTES == {"dense": None, "varlen": None}


def test_flash_stops_main_before_any_output(no_flash, monkeypatch, tmp_path):
    """ATTENTION=flash where FlashAttention cannot run stops the run before the log or any output is written."""
    monkeypatch.setenv("ATTENTION", "flash")
    monkeypatch.setenv("LOG_PATH", str(tmp_path / "log.txt"))
    with pytest.raises(RuntimeError, match="ATTENTION=flash"):
        tg.main()
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# the FA4 op around a stand-in for FA4's kernels (CPU)
# ----------------------------------------------------------------------------------------------


def reference(q, k, v, cu, t):
    """Causal attention in FA's layout with PyTorch: q (B, T, H, D), or (N, H, D) with cu_seqlens cu; k, v with Hkv
    heads -> (y like q, lse (B, H, T) or (H, N), softmax probabilities (H, N, N), the flattened k and v)."""
    b = q.size(0) if cu is None else None
    q, k, v = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))
    n, h = q.shape[:2]
    k, v = (x.repeat_interleave(h // x.size(1), 1) for x in (k, v))
    starts = torch.arange(0, n, t) if cu is None else cu[:-1].long()
    seg = torch.zeros(n, dtype=torch.long).index_fill_(0, starts, 1).cumsum(0)
    allowed = (seg[:, None] == seg[None]) & torch.ones(n, n, dtype=torch.bool).tril()
    s = torch.einsum("nhd,mhd->hnm", q, k).div(q.size(-1) ** 0.5).masked_fill(~allowed, float("-inf"))
    lse, p = s.logsumexp(-1), s.softmax(-1)
    y = torch.einsum("hnm,mhd->nhd", p, v)
    if b is not None:
        y, lse = y.view(b, -1, *y.shape[1:]), lse.view(h, b, -1).transpose(0, 1).contiguous()
    return y, lse, p, k, v


def standin_fa4(calls: list) -> types.SimpleNamespace:
    """flash_attn.cute.interface's two private calls that `tg.flash4` makes, with their keyword names, computed by
    `reference`; the backward by the textbook formulas, since autograd does not record inside an op."""

    returned = []  # each forward's (y, lse), one of which each backward must be handed back

    def check(causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q):
        assert causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        assert (q.dim() == 3) == (cu_seqlens_q is not None)
        assert cu_seqlens_q is None or cu_seqlens_q.dtype == torch.int32

    def fwd(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal=False,
            return_lse=False):
        check(causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q)
        calls.append("fwd")
        y, lse, *_ = reference(q, k, v, cu_seqlens_q, max_seqlen_q)
        returned.append((y.contiguous(), lse))  # FA4's outputs are contiguous
        return returned[-1][0], lse if return_lse else None, None, None, None

    def bwd(q, k, v, out, dout, lse, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            causal=False):
        check(causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q)
        calls.append("bwd")
        # the op hands back what its forward returned, bit for bit (recomputing it is not bitwise stable: CPU
        # matmuls split their sums by the threads free at the time, and CI once saw lse differ by 5e-5)
        assert any(torch.equal(out, y) and torch.equal(lse, lse_y) for y, lse_y in returned)
        _, _, p, k_rep, v_rep = reference(q, k, v, cu_seqlens_q, max_seqlen_q)
        do = dout.reshape(-1, *dout.shape[-2:])
        dv = torch.einsum("hnm,nhd->mhd", p, do)
        dp = torch.einsum("nhd,mhd->hnm", do, v_rep)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / q.size(-1) ** 0.5
        dq = torch.einsum("hnm,mhd->nhd", ds, k_rep)
        dk = torch.einsum("hnm,nhd->mhd", ds, q.reshape(-1, *q.shape[-2:]))
        group = lambda d: d.unflatten(1, (k.size(-2), -1)).sum(2)  # noqa: E731  per kv head
        return [d.reshape(x.shape).contiguous() for d, x in ((dq, q), (group(dk), k), (group(dv), v))]

    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


@pytest.fixture
def fa4_standin(monkeypatch):
    """The FA4 route of `select_attention`, on the stand-in; yields the list of kernel calls made."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", standin_fa4(calls))
    route = lambda *a: tg.flash4(*a, None, None, None)[0]  # noqa: E731  what select_attention routes for FA4
    tg.ATTENTION_ROUTES.update(dense=route, varlen=route)
    yield calls


def qkv_and_segments(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 24, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    ids = torch.randint(3, 300, (2, 24), generator=g)
    ids[0, 7], ids[1, 3], ids[1, 4], ids[1, 15] = BOS, BOS, BOS, BOS
    return (q, k, v), tg.doc_segments(ids, BOS)


def attention_and_grads(fn, qkv, cu, g_out):
    y = fn(*qkv, cu)
    return [y, *torch.autograd.grad(y, qkv, g_out)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_flash4_route_matches_pytorch(fa4_standin, masked, compiled):
    """causal_attention through `tg.flash4` (eager, and traced whole by torch.compile: fullgraph, fake tensors,
    AOT autograd) gives PyTorch's outputs and q/k/v gradients, dense and per document."""
    qkv, cu = qkv_and_segments()
    cu = cu if masked else None
    g_out = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(tg.causal_attention, backend="aot_eager", fullgraph=True) if compiled else tg.causal_attention
    got = attention_and_grads(fn, qkv, cu, g_out)
    assert fa4_standin == ["fwd", "bwd"]
    routes = dict(tg.ATTENTION_ROUTES)
    tg.ATTENTION_ROUTES.update(dense=None, varlen=None)
    want = attention_and_grads(tg.causal_attention, qkv, cu, g_out)
    tg.ATTENTION_ROUTES.update(routes)
    for a, b in zip(got, want):  # fp32 sums in another order: a 5e-5 gradient difference was seen once under load
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("doc_mask", [False, True])
def test_model_compiles_whole_on_flash4(fa4_standin, doc_mask):
    """The model on the FA4 route compiles as one graph (no break at any attention layer) and gives the loss and
    gradients of PyTorch's route."""
    model = tiny_model(seed=3, doc_mask=doc_mask)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    ids[0, 17], ids[1, 5] = BOS, BOS
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(ids, ids, cu_seqlens=model.segments(ids)).backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert fa4_standin == ["fwd", "fwd", "bwd", "bwd"]  # two layers
    model.zero_grad()
    tg.ATTENTION_ROUTES.update(dense=None, varlen=None)
    model(ids, ids, cu_seqlens=model.segments(ids)).backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("doc_mask", [False, True])
def test_warm_up_compiles_the_graphs_the_passes_use(fa4_standin, tokenizer, doc_mask, monkeypatch):
    """After warm_up_eval_graphs, a scoring pass of the compiled model (the GPU path: FA4 route, document segments
    marked dynamic) runs without one recompilation. torch.compile guards on strides: the P300 run of code 581a467c
    warmed up on contiguous inputs and compiled its graphs again (eval 170 s longer)."""
    tokens = torch.from_numpy(docs_tokens(tokenizer.sp, 4 * 64 + 1, seed=8).astype("int64"))
    bpt = tg.target_bytes(tokens, tg.byte_tables(tokenizer.sp))
    args = tg.Hyperparameters(vocab_size=320, train_seq_len=64, eval_stride=32, eval_batch_seqs=4)
    torch._dynamo.reset()
    model = tiny_model(seed=5, doc_mask=doc_mask)
    model_fn = torch.compile(model, dynamic=False, backend="eager")
    tg.warm_up_eval_graphs(model, model_fn, args, runtime())
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    tg.evaluate(model_fn, tokens, bpt, args.eval_stride, args, runtime())
    torch._dynamo.reset()


def test_warm_up_leaves_an_eager_model_alone(monkeypatch):
    """On CPU maybe_compile returns the model itself: warm_up_eval_graphs then runs nothing (no forward, no grads)."""
    model = tiny_model(seed=5, doc_mask=True)
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("warm-up ran an eager model"))
    tg.warm_up_eval_graphs(model, model, tg.Hyperparameters(vocab_size=320, train_seq_len=64), runtime())
    assert all(p.grad is None for p in model.parameters())


def test_flash4_op_passes_opcheck(fa4_standin):
    """torch.library.opcheck (schema, fake tensors against the real outputs, autograd registration) of both
    directions of `tg.flash4`, dense and variable-length."""
    (q, k, v), cu = qkv_and_segments(2)
    for inputs in ((q, k, v, None, 24), (*(x.detach().flatten(0, 1).requires_grad_() for x in (q, k, v)), cu, 24)):
        torch.library.opcheck(tg.flash4, (*inputs, None, None, None))
        y, lse = tg.flash4(*inputs, None, None, None)
        torch.library.opcheck(tg.flash4, (*(x.detach() for x in inputs[:3]), *inputs[3:], y.detach(), lse.detach(),
                                          torch.randn_like(y)))


# ----------------------------------------------------------------------------------------------
# GPU: the real FlashAttention
# ----------------------------------------------------------------------------------------------


def flash_installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no flash_attn package at all
        return False


def test_gpu_flash_matches_sdpa(monkeypatch):
    """With ATTENTION=flash on a GPU, causal_attention runs FlashAttention, and it agrees with the fp32 masked-SDPA
    reference within bf16 tolerance in outputs and q/k/v gradients, dense and with real BOS boundaries; compiled
    (fullgraph) as eager."""
    if not torch.cuda.is_available() or not flash_installed():
        pytest.skip("needs CUDA and flash-attn-4 (requirements-gpu.txt)")
    line = tg.select_attention(settings("flash"), CUDA)
    assert "dense=flash-attn" in line and "varlen=flash-attn" in line
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(4, 256, h, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
           for h in (8, 4, 4)]
    ids = torch.randint(3, 1000, (4, 256), device="cuda", generator=g)
    ids[torch.rand(4, 256, device="cuda", generator=g) < 0.02] = BOS
    g_out = torch.randn(qkv[0].shape, device="cuda", generator=g, dtype=torch.bfloat16)
    compiled = torch.compile(tg.causal_attention, fullgraph=True, dynamic=False)
    for cu in (None, tg.doc_segments(ids, BOS)):
        ref_in = [t.detach().float().cpu().requires_grad_() for t in qkv]
        with monkeypatch.context() as m:
            m.setattr(tg, "ATTENTION_ROUTES", {"dense": None, "varlen": None})
            want = attention_and_grads(tg.causal_attention, ref_in, cu if cu is None else cu.cpu(), g_out.float().cpu())
        for fn in (tg.causal_attention, compiled):
            got = attention_and_grads(fn, qkv, cu, g_out)
            for a, b, tol in zip(got, want, (1e-2, 2e-2, 2e-2, 2e-2)):
                assert ((a.float().cpu() - b).norm() / b.norm()) < tol
