"""bench/quant_variants.py on the tiny model (CPU): every variant's artifact fits the budget, LQER lowers the error of
the matrices it corrects, SDClip's scales are k * std(row) / qmax per class, and a saved float bundle loads back
exactly. QUANT_MIN_NUMEL is lowered (as in test_quantization.py) so the tiny matrices get integer codes."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO_ROOT, BOS, runtime, tg, tiny_config, tiny_model

THRESHOLD = 1024
spec = importlib.util.spec_from_file_location("quant_variants", REPO_ROOT / "bench" / "quant_variants.py")
qv = sys.modules["quant_variants"] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(qv)


@pytest.fixture(autouse=True)
def small_quant_threshold(monkeypatch):
    monkeypatch.setattr(tg, "QUANT_MIN_NUMEL", THRESHOLD)


@pytest.fixture(scope="module")
def float_model(data_dir):
    """(state, Hessians, config, budget): a perturbed tiny GPT, its Hessians from two training batches, and a budget
    of 80 % of its artifact at step scale 1, so every variant has to be fitted."""
    model = tiny_model(seed=11)
    loader = tg.TokenLoader(str(data_dir / "fineweb_train_*.bin"), 64, 4, runtime(), 0, tiny_config()["vocab_size"])
    hessians = tg.collect_hessians(model, loader, 2, runtime())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "QUANT_MIN_NUMEL", THRESHOLD)
        groups, small = tg.matrix_groups(state, hessians), tg.quantize_small_tensors(state)
        full = len(tg.pack_artifact(tiny_config(), {**small, **tg.quantize_groups(groups, 1.0, use_gptq=True)}))
    return state, hessians, tiny_config(), int(0.8 * full)


@pytest.fixture(scope="module")
def results(float_model):
    """Screen.run for baseline, sdclip and lqer on one Screen (sharing baseline's fit)."""
    state, hessians, config, budget = float_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "QUANT_MIN_NUMEL", THRESHOLD)
        screen = qv.Screen(state, hessians, config, budget)
        return screen, {n: screen.run(qv.VARIANTS[n]) for n in ("baseline", "sdclip", "lqer")}


def test_variants_fit_the_budget(float_model, results):
    """Every artifact is <= the budget and, fitted, lands within the tolerance under it; the round trip loads into the
    model strictly; lqer's GPTQ part got a smaller budget, so a coarser step scale, than baseline."""
    state, _, config, budget = float_model
    _, res = results
    for r in res.values():
        assert budget * (1 - 5e-4) - 4096 <= len(r.blob) <= budget, r.name
        assert tg.unpack_artifact(r.blob)[0] == config
        tg.GPT(**config).load_state_dict(qv.roundtrip_weights(r.blob), strict=True)
    assert res["baseline"].alpha > 1.0  # the fit was active
    assert res["lqer"].fit_budget < budget and res["lqer"].alpha > res["baseline"].alpha


def test_lqer_lowers_the_error_of_its_matrices(float_model, results):
    """The 3 corrected matrices are the 3 of largest quant_error; ||W - W'||_F < ||W - W_hat||_F for each (W' read back
    from the packed artifact), by at least 80 % of what the exact rank-4 SVD would remove; the factors are int4 codes
    (rank 4) stored in the artifact; the other matrices are untouched."""
    state, hessians, _, _ = float_model
    _, res = results
    r = res["lqer"]
    _, entries = tg.unpack_artifact(r.blob)
    model_entries, extra = qv.split_entries(entries)
    w_hat, w_prime = tg.dequantize_entries(model_entries), qv.roundtrip_weights(r.blob)
    errors = {n: qv.quant_error(state[n] - w_hat[n], hessians.get(n))
              for n, e in model_entries.items() if e["kind"] in tg.INT_KINDS.values()}
    top3 = sorted(errors, key=errors.get, reverse=True)[:3]
    assert [n for n, *_ in r.chosen] == top3
    for name in top3:
        e = state[name] - w_hat[name]
        residual = (state[name] - w_prime[name]).square().sum()
        assert residual < e.square().sum(), name  # ||W - W'||_F < ||W - W_hat||_F
        s = torch.linalg.svdvals(e)
        assert e.square().sum() - residual >= 0.8 * s[:4].square().sum(), name  # >= 80 % of the exact rank-4 gain
        a, b = extra[f"{name}#lqer_a"]["q"], extra[f"{name}#lqer_b"]["q"]
        assert a.shape == (state[name].shape[0], 4) and b.shape == (4, state[name].shape[1])
        assert int(a.min()) >= 0 and int(a.max()) <= 15 and int(b.min()) >= 0 and int(b.max()) <= 15
    for name in set(w_hat) - set(top3):
        assert torch.equal(w_hat[name], w_prime[name])


def test_sdclip_scales_are_k_times_row_std(float_model, results):
    """sdclip's fitted step sizes are c * k * std(row) / qmax with k per class (12 MLP, 13 attention, 15 int7) and one
    c for all classes (the fitted alpha times SDCLIP_BASE), up to fp16 rounding."""
    state, _, _, _ = float_model
    _, res = results
    alpha = res["sdclip"].alpha
    _, entries = tg.unpack_artifact(res["sdclip"].blob)
    classes = set()
    for name, e in entries.items():
        if e["kind"] not in tg.INT_KINDS.values():
            continue
        qmax = tg.INT6_MAX if e["kind"] == "int6" else tg.INT7_MAX
        cls = qv.sdclip_class(name, qmax)
        classes.add(cls)
        expected = alpha * {"mlp": 12.0, "attn": 13.0, "int7": 15.0}[cls] * state[name].std(-1, correction=0) / qmax
        torch.testing.assert_close(e["scale"].float(), expected, rtol=2e-3, atol=1e-7)
    assert classes == {"mlp", "attn", "int7"}


def test_quantize_asym_bounds():
    """Codes in [0, 15]; each row's reconstruction is within half a step (plus fp16 rounding of the offset)."""
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(3)) * 0.01
    x[4] = 0.5  # a constant row
    codes, scale, zero = qv.quantize_asym(x)
    assert codes.dtype == torch.int8 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scale.dtype == zero.dtype == torch.float16
    err = (qv.dequantize_asym(codes, scale, zero) - x).abs()
    assert bool((err <= scale.float()[:, None] / 2 + zero.float().abs()[:, None] * 1e-3 + 1e-7).all())


def test_save_load_round_trip(float_model, tmp_path):
    """--save's bundle loads back bit-exactly (state, Hessians, config, meta); a foreign file is refused."""
    state, hessians, config, _ = float_model
    path = tmp_path / "float.pt"
    meta = {"steps": 3, "code_sha256": "x", "float_val_bpb": 1.25}
    qv.save_float(str(path), state, hessians, config, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["float.pt"]  # no temporary file left
    bundle = qv.load_float(str(path))
    assert bundle["config"] == config and bundle["meta"] == meta
    for key, ref in (("state", state), ("hessians", hessians)):
        assert set(bundle[key]) == set(ref)
        for name, t in ref.items():
            assert bundle[key][name].dtype == t.dtype and torch.equal(bundle[key][name], t), name
    torch.save({"state": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a bench/quant_variants.py float bundle"):
        qv.load_float(str(tmp_path / "other.pt"))


def test_main_load_prints_the_table(float_model, tokenizer, data_dir, tmp_path, monkeypatch, capsys):
    """main(--load) on the tiny data: one table row per variant, bytes <= --max-bytes, baseline's d_bpb 0, the log
    file holds the table and the summary."""
    state, hessians, config, budget = float_model
    qv.save_float(str(tmp_path / "float.pt"), state, hessians, config, {})
    for f in tg.fields(tg.Hyperparameters):
        monkeypatch.delenv(f.name.upper(), raising=False)
    env = dict(DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer.path), VOCAB_SIZE=str(tokenizer.vocab_size),
               TRAIN_SEQ_LEN="64", EVAL_BATCH_SEQS="8", EVAL_STRIDE="32", LOG_PATH=str(tmp_path / "log.txt"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert config["bos_id"] == BOS
    assert qv.main(["--load", str(tmp_path / "float.pt"), "--variants", "baseline,lqer",
                    "--max-bytes", str(budget), "--min-numel", str(THRESHOLD)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("baseline", "lqer")}
    assert set(rows) == {"baseline", "lqer"}
    for cols in rows.values():
        assert int(cols[2]) <= budget
    assert rows["baseline"][6] == "+0.000000"
    log = (tmp_path / "log.txt").read_text()
    assert "variant      alpha" in log and "summary float" in log and "artifacts <= " in log
