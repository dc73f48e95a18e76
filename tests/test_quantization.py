"""Quantization: int6 (GPTQ) / int7 / fp16 entries, the artifact (rANS codes + zstd rest) round trip, fitting a budget.

The tiny model's matrices are far below QUANT_MIN_NUMEL (65,536), so the threshold is lowered for
these tests; every path (int6 block matrices, int7 embeddings, fp16/fp32 small tensors) is then used.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CPU, runtime, tg, tiny_config, tiny_model

THRESHOLD = 1024


@pytest.fixture(autouse=True)
def small_quant_threshold(monkeypatch):
    monkeypatch.setattr(tg, "QUANT_MIN_NUMEL", THRESHOLD)


@pytest.fixture(scope="module")
def model_and_hessians(data_dir):
    """A perturbed tiny GPT and its GPTQ Hessians from two training batches of the synthetic shards."""
    model = tiny_model(seed=11)
    loader = tg.TokenLoader(str(data_dir / "fineweb_train_*.bin"), 64, 4, runtime(), 0, tiny_config()["vocab_size"])
    hessians = tg.collect_hessians(model, loader, 2, runtime())
    return model, hessians


def expected_kind(name: str, t: torch.Tensor) -> str:
    if name.startswith("blocks.") and t.ndim == 2 and t.numel() > THRESHOLD:
        return "int6"
    if t.ndim == 2 and t.numel() > THRESHOLD:
        return "int7"
    return "fp16" if t.ndim == 2 else "fp32"


def quantize(state, hessians, config, max_bytes):
    """main()'s path: group the large matrices, store the rest as floats, fit the byte budget."""
    return tg.quantize_to_fit(tg.matrix_groups(state, hessians), tg.quantize_small_tensors(state), config, max_bytes)


# ----------------------------------------------------------------------------------------------
# Hessians
# ----------------------------------------------------------------------------------------------


def test_collect_hessians(model_and_hessians):
    """One symmetric PSD (in, in) matrix per block linear layer and one for the tied head; q/k/v share
    their input; the attention and MLP inputs are RMS-normed times 1/sqrt(layer+1), so their Hessian
    trace is dim/(layer+1); the head's input is RMS-normed, so its trace is dim."""
    model, hessians = model_and_hessians
    linear = {f"blocks.{n}.weight": m for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hessians) == set(linear) | {"tok_emb.weight"} and len(hessians) == 13
    dim = tiny_config()["model_dim"]
    for name, h in hessians.items():
        n_in = linear[name].in_features if name in linear else dim
        assert h.shape == (n_in, n_in) and h.dtype == torch.float32
        torch.testing.assert_close(h, h.T)
        assert float(torch.linalg.eigvalsh(h.double()).min()) > -1e-6
    assert float(hessians["tok_emb.weight"].trace()) == pytest.approx(dim, rel=1e-4)
    for layer in (0, 1):
        prefix = f"blocks.{layer}."
        assert torch.equal(hessians[prefix + "attn.c_q.weight"], hessians[prefix + "attn.c_k.weight"])
        assert torch.equal(hessians[prefix + "attn.c_q.weight"], hessians[prefix + "attn.c_v.weight"])
        for role in ("attn.c_q.weight", "mlp.fc.weight"):
            assert float(hessians[prefix + role].trace()) == pytest.approx(dim / (layer + 1), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# row quantizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qmax", [tg.INT6_MAX, tg.INT7_MAX])
def test_quantize_rows_error_bound(qmax):
    """Round-to-nearest: error <= scale/2 inside the clip range, codes saturate at +-qmax outside it."""
    g = torch.Generator().manual_seed(qmax)
    w = torch.randn(3, 20, 50, generator=g)
    scale = torch.rand(3, 20, generator=g) * 0.1 + 0.01
    q = tg.quantize_rows(w, scale, qmax)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.abs().max()) <= qmax
    err = (q.float() * scale[..., None] - w).abs()
    inside = w.abs() <= qmax * scale[..., None]
    assert bool((err[inside] <= scale[..., None].expand_as(w)[inside] / 2 * (1 + 1e-6)).all())
    assert bool((q[~inside].abs() == qmax).all()) and (~inside).any()


def test_choose_row_scales():
    """Scales are fp16-representable, one per row, and never worse (RTN squared error) than max-abs scaling
    or clipping at a quantile of |w|."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, 2000, generator=g)
    w[0, 3, 7] = 40.0  # an outlier row
    scale = tg.choose_row_scales(w, tg.INT6_MAX)
    assert scale.shape == (2, 16) and scale.dtype == torch.float32
    assert torch.equal(scale.half().float(), scale)

    def rtn_err(s):
        return (tg.quantize_rows(w, s, tg.INT6_MAX).float() * s[..., None] - w).square().sum(-1)

    # the chosen scale is at least as good as every clip candidate (max-abs, and each quantile)
    candidates = [w.abs().amax(-1)] + [torch.quantile(w.abs(), q, dim=-1) for q in (0.999, 0.9995, 0.9999)]
    for clip in candidates:
        assert bool((rtn_err(scale) <= rtn_err((clip / tg.INT6_MAX).half().float()) * (1 + 1e-6)).all())
    # and it is not simply max-abs scaling: clipping wins on some Gaussian rows
    assert bool((scale < (w.abs().amax(-1) / tg.INT6_MAX).half().float()).any())


def hessian_error(w, q, scale, h):
    d = w - q.float() * scale[..., None]
    return float(torch.einsum("lrc,lcd,lrd->", d, h, d))


def correlated_problem(seed: int, layers=2, rows=24, cols=40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(layers, rows, cols, generator=g)
    x = torch.randn(layers, 400, cols, generator=g) @ torch.randn(layers, cols, cols, generator=g)
    h = x.mT @ x / 400
    scale = tg.choose_row_scales(w, tg.INT6_MAX) * 4  # coarse steps, so rounding errors matter
    return w, h, scale


def test_gptq_beats_round_to_nearest():
    """With correlated inputs GPTQ gives a lower Hessian-weighted error trace((W-Q)H(W-Q)^T) than RTN."""
    gptq_err = rtn_err = 0.0
    for seed in range(3):
        w, h, scale = correlated_problem(seed)
        q = tg.gptq_quantize(w, h, scale, tg.INT6_MAX, block=16)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= tg.INT6_MAX
        gptq_err += hessian_error(w, q, scale, h)
        rtn_err += hessian_error(w, tg.quantize_rows(w, scale, tg.INT6_MAX), scale, h)
    assert gptq_err < 0.8 * rtn_err


def test_gptq_with_diagonal_hessian_is_round_to_nearest():
    """A diagonal Hessian propagates no error, so GPTQ must return RTN codes in the original column
    order (checks the act-order permutation is undone), for a block size that splits the columns."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 12, 37, generator=g)
    h = torch.diag_embed(torch.rand(2, 37, generator=g) + 0.1)
    scale = tg.choose_row_scales(w, tg.INT6_MAX)
    q = tg.gptq_quantize(w, h, scale, tg.INT6_MAX, block=8)
    assert torch.equal(q, tg.quantize_rows(w, scale, tg.INT6_MAX))


def test_gptq_dead_columns_are_zero():
    """Columns whose input is always zero (zero Hessian diagonal) get code 0."""
    w, h, scale = correlated_problem(7)
    dead = [3, 17]
    h[:, dead, :] = 0
    h[:, :, dead] = 0
    q = tg.gptq_quantize(w, h, scale, tg.INT6_MAX)
    assert bool((q[:, :, dead] == 0).all())
    assert bool((q[:, :, [0, 1, 2]] != 0).any())


# ----------------------------------------------------------------------------------------------
# artifact
# ----------------------------------------------------------------------------------------------


def test_quantize_pack_unpack_dequantize(model_and_hessians, tmp_path):
    """Every tensor survives pack -> unpack bit-exactly, with the right kind, code range, shape and dtype;
    dequantized values are close to the float weights (RTN int7 within scale/2)."""
    model, hessians = model_and_hessians
    state, config = model.state_dict(), tiny_config()
    entries, alpha = quantize(state, hessians, config, 10**9)
    assert alpha == 1.0
    assert set(entries) == set(state)
    kinds = {name: expected_kind(name, t) for name, t in state.items()}
    assert {e["kind"] for e in entries.values()} == {"int6", "int7", "fp16", "fp32"}

    blob = tg.pack_artifact(config, entries)
    path = tmp_path / "model.ptz"
    path.write_bytes(blob)
    assert path.stat().st_size == len(blob)
    # the rANS words: the codes' order-0 entropy per tensor plus at most the final state (2 words) and rounding
    assert blob.startswith(tg.ARTIFACT_MAGIC)
    words = 4 * int.from_bytes(blob[len(tg.ARTIFACT_MAGIC) : len(tg.ARTIFACT_MAGIC) + 8], "little")
    assert words == pytest.approx(code_entropy_bytes(entries), abs=12)
    config2, entries2 = tg.unpack_artifact(path.read_bytes())
    assert config2 == config
    assert set(entries2) == set(entries)
    for name, e in entries2.items():
        assert e["kind"] == entries[name]["kind"] == kinds[name], name
        for field in ("q", "scale", "data"):
            if field in entries[name]:
                assert e[field].dtype == entries[name][field].dtype and torch.equal(e[field], entries[name][field])

    deq = tg.dequantize_entries(entries2)
    for name, w in state.items():
        e, w = entries2[name], w.float()
        assert deq[name].shape == w.shape and deq[name].dtype == torch.float32, name
        if e["kind"] in ("int6", "int7"):
            qmax = tg.INT6_MAX if e["kind"] == "int6" else tg.INT7_MAX
            assert e["q"].dtype == torch.int8 and int(e["q"].abs().max()) <= qmax
            assert e["scale"].dtype == torch.float16 and e["scale"].shape == (w.shape[0],)
            rel = float((deq[name] - w).norm() / w.norm())
            assert rel < 0.1, (name, rel)
        if e["kind"] in ("int6", "int7") and name not in hessians:  # plain round-to-nearest: per-element bound where not clipped
            s = e["scale"].float()[:, None].expand_as(w)
            inside = w.abs() <= qmax * s
            assert bool(((deq[name] - w).abs()[inside] <= s[inside] / 2 * (1 + 1e-5)).all())
        if e["kind"] == "fp16":
            assert torch.equal(deq[name], w.half().float())
        if e["kind"] == "fp32":
            assert torch.equal(deq[name], w)


def code_entropy_bytes(entries: dict) -> float:
    """Order-0 entropy of each int6/int7 tensor's codes (its own histogram), summed, in bytes."""
    total = 0.0
    for e in entries.values():
        if e["kind"] in ("int6", "int7"):
            p = torch.unique(e["q"], return_counts=True)[1].double() / e["q"].numel()
            total -= float((p * p.log2()).sum()) * e["q"].numel() / 8
    return total


@pytest.mark.parametrize("codes", ["constant", "full_range", "none"])
def test_pack_unpack_edge_codes(codes):
    """Bit-exact round trip of codes that are all one value (a one-symbol histogram), that span the whole int6/int7
    range, and of an artifact without codes (no rANS words: the quick start's size)."""
    g = torch.Generator().manual_seed(3)
    entries = {"norm": {"kind": "fp32", "data": torch.randn(7, generator=g)},
               "small": {"kind": "fp16", "data": torch.randn(5, 3, generator=g).half()}}
    if codes != "none":
        for name, qmax in (("a", tg.INT6_MAX), ("b", tg.INT7_MAX)):
            q = (torch.full((6, 50), -qmax + 2, dtype=torch.int8) if codes == "constant"
                 else torch.randint(-qmax, qmax + 1, (6, 50), generator=g, dtype=torch.int8))
            entries[name] = {"kind": tg.INT_KINDS[qmax], "q": q, "scale": torch.rand(6, generator=g).half()}
    blob = tg.pack_artifact({"x": 1}, entries)
    config, back = tg.unpack_artifact(blob)
    assert config == {"x": 1} and set(back) == set(entries)
    for name, e in entries.items():
        for field, t in e.items():
            assert back[name][field] == t if field == "kind" else (back[name][field].dtype == t.dtype
                                                                   and torch.equal(back[name][field], t))
    n_words = int.from_bytes(blob[len(tg.ARTIFACT_MAGIC) : len(tg.ARTIFACT_MAGIC) + 8], "little")
    assert (n_words == 0) == (codes != "full_range")  # constant codes cost 0 bits: only the empty final state


def test_tied_head_gets_gptq(model_and_hessians):
    """The tied embedding is quantized by GPTQ with the head's Hessian: int7 codes whose head-logit error
    trace(dW H dW^T) is below round-to-nearest's at the same scales."""
    model, hessians = model_and_hessians
    state = model.state_dict()
    entries, _ = quantize(state, hessians, tiny_config(), 10**9)
    e, w = entries["tok_emb.weight"], state["tok_emb.weight"].float()[None]
    assert e["kind"] == "int7"
    scale, h = e["scale"].float()[None], hessians["tok_emb.weight"][None]
    rtn = tg.quantize_rows(w, scale, tg.INT7_MAX)
    assert hessian_error(w, e["q"][None], scale, h) < hessian_error(w, rtn, scale, h)


@pytest.mark.parametrize("fraction", [0.97, 0.85, 0.6])
def test_quantize_to_fit_tight_budget(model_and_hessians, fraction):
    """A budget below the alpha=1 size forces coarser int6 and int7 steps (alpha > 1), and the packed artifact lands
    under it by at most the tolerance (0.05%) plus the few bytes between the entropy estimate and the rANS words."""
    model, hessians = model_and_hessians
    state, config = model.state_dict(), tiny_config()
    loose, alpha1 = quantize(state, hessians, config, 10**9)
    loose_size = len(tg.pack_artifact(config, loose))
    budget = int(loose_size * fraction)
    tight, alpha = quantize(state, hessians, config, budget)
    assert alpha1 == 1.0 and alpha > 1.0
    assert 0 <= budget - len(tg.pack_artifact(config, tight)) <= 5e-4 * budget + 16
    for name, e in tight.items():
        if e["kind"] in ("int6", "int7"):
            # step sizes are the alpha=1 ones scaled by alpha (up to fp16 rounding)
            torch.testing.assert_close(e["scale"].float(), (loose[name]["scale"].float() * alpha).half().float(),
                                       rtol=2e-3, atol=0)
            assert int(e["q"].abs().max()) <= (tg.INT6_MAX if e["kind"] == "int6" else tg.INT7_MAX)
        else:
            assert torch.equal(e["data"], loose[name]["data"])  # small tensors do not change


def test_quantize_to_fit_nothing_fits(model_and_hessians):
    """A budget below the small tensors' packed size: ValueError, whatever alpha."""
    model, hessians = model_and_hessians
    state = model.state_dict()
    small = len(tg.pack_artifact(tiny_config(), tg.quantize_small_tensors(state)))
    with pytest.raises(ValueError, match=f"cannot fit the artifact in {small - 1} bytes: the small tensors alone"):
        quantize(state, hessians, tiny_config(), small - 1)


def test_quantize_to_fit_without_hessians_uses_rtn(model_and_hessians):
    """Matrices without a Hessian are rounded to nearest with the clip-searched scales."""
    model, _ = model_and_hessians
    state = model.state_dict()
    entries, alpha = quantize(state, {}, tiny_config(), 10**9)
    assert alpha == 1.0
    name = "blocks.1.mlp.fc.weight"
    w = state[name].float()
    scale = tg.choose_row_scales(w, tg.INT6_MAX)
    assert torch.equal(entries[name]["q"], tg.quantize_rows(w, scale, tg.INT6_MAX))


@torch.no_grad()
def test_load_artifact_model_matches_dequantized(model_and_hessians, tmp_path):
    """load_artifact_model rebuilds, from the file alone, a model whose logits equal a GPT loaded with the
    dequantized state dict, and close to the float model's."""
    model, hessians = model_and_hessians
    config = tiny_config()
    entries, _ = quantize(model.state_dict(), hessians, config, 10**9)
    path = tmp_path / "model.ptz"
    path.write_bytes(tg.pack_artifact(config, entries))

    loaded, loaded_config = tg.load_artifact_model(str(path), CPU)
    assert loaded_config == config
    reference = tg.GPT(**config)
    reference.load_state_dict(tg.dequantize_entries(entries))
    x = torch.randint(3, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.eval()(x), reference.eval()(x), rtol=0, atol=1e-6)
    # quantization is a small perturbation of the float model
    y = torch.randint(3, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    assert float(loaded(x, y)) == pytest.approx(float(model(x, y)), abs=0.05)
    assert not np.isclose(float(loaded(x, y)), float(tg.GPT(**config).eval()(x, y)), atol=1e-3)
