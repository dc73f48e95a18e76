"""Small building blocks: LR schedule, EMA, Newton-Schulz, partial RoPE, XSA, the model config."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import BOS, REPO_ROOT, runtime, tg, tiny_model

_spec = importlib.util.spec_from_file_location("train_step_bench", REPO_ROOT / "bench" / "train_step.py")
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)


@pytest.mark.parametrize("progress, frac, expected", [
    (0.0, 0.6, 1.0), (0.4, 0.6, 1.0), (0.7, 0.6, 0.5), (0.85, 0.6, 0.25), (1.0, 0.6, 0.0), (1.2, 0.6, 0.0),
    (0.5, 0.0, 1.0), (0.99, 0.0, 1.0), (0.25, 1.0, 0.75),
])
def test_lr_scale(progress, frac, expected):
    """Flat at 1, then linear to 0 over the last `warmdown_frac` of progress."""
    assert tg.lr_scale(progress, frac) == pytest.approx(expected, abs=1e-12)


def test_ema_update_and_copy():
    """shadow <- decay * shadow + (1 - decay) * p, in fp32; copy_to_model writes the shadow back."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = tg.EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-4.0)
    ema.update()  # 0.75 * 1 + 0.25 * 3 = 1.5 ; 0.75 * 0 + 0.25 * -4 = -1
    ema.update()  # 0.75 * 1.5 + 0.25 * 3 = 1.875 ; -0.75 - 1 = -1.75
    ema.copy_to_model()
    assert torch.allclose(model.weight, torch.full((2, 3), 1.875))
    assert torch.allclose(model.bias, torch.full((2,), -1.75))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 48, 48)])
def test_newton_schulz_orthogonalises(shape):
    """NS5 maps a matrix to (roughly) U V^T: same shape, singular values pulled near 1 (Muon's 0.5-1.5
    band), singular vectors kept (positive alignment with the input). Inputs have singular values
    spread over a factor 25 (five quintic steps cannot lift much smaller ones)."""
    gen = torch.Generator().manual_seed(0)
    *batch, m, n = shape
    u, _ = torch.linalg.qr(torch.randn(*batch, m, m, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen))
    k = min(m, n)
    s = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), k)).expand(*batch, k)
    g = u[..., :k] @ torch.diag_embed(s) @ v[..., :k].mT
    x = tg.newton_schulz5(g).float()
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    assert float(s.min()) > 0.4 and float(s.max()) < 1.6
    assert float((x * g).sum()) > 0


@pytest.mark.parametrize("row_normalize", [False, True])
def test_muon_row_normalize_equilibrates_rows(row_normalize):
    """MuonEq-R: with row_normalize the step ignores how large each gradient row is (scaling rows by
    positive factors leaves it unchanged) and equals NS5 of the row-normalised Nesterov update;
    plain Muon lets a large row dominate."""
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(16, 32, generator=gen)
    row_scale = torch.logspace(-2, 2, 16)[:, None]

    def step(g):
        p = torch.nn.Parameter(torch.zeros(16, 32))
        opt = tg.Muon([p], lr=0.1, momentum=0.5, weight_decay=0.0, rt=runtime(), row_normalize=row_normalize)
        p.grad = g.clone()
        opt.step()
        return p.detach()

    plain, scaled = step(grad), step(grad * row_scale)
    if row_normalize:
        torch.testing.assert_close(plain, scaled, atol=2e-3, rtol=0)
        nesterov = 1.5 * grad
        expected = -0.1 * tg.newton_schulz5(nesterov / nesterov.norm(dim=-1, keepdim=True)).float()
        torch.testing.assert_close(plain, expected, atol=1e-3, rtol=0)
    else:
        assert (plain - scaled).abs().max() > 10 * 2e-3  # ten times the tolerance above


def test_rotary_is_relative_and_partial():
    """Rotated q.k depends only on the position difference; dims beyond rope_dims are untouched."""
    rot = tg.Rotary(rope_dims=8, base=10000.0, max_len=32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def at(v, pos):
        x = torch.zeros(1, 32, 1, 16)
        x[:, pos] = v[:, 0]
        return rot(x)[:, pos]

    d1 = (at(q, 10) * at(k, 7)).sum()
    d2 = (at(q, 25) * at(k, 22)).sum()
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose((at(q, 10) * at(k, 7)).sum(), (at(q, 10) * at(k, 9)).sum(), atol=1e-4)
    x = torch.randn(2, 32, 3, 16, generator=g)
    y = rot(x)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is the identity


def test_exclude_self_value():
    """XSA output is orthogonal to the token's own value vector (for every query head of its group)
    and equals the input minus that projection."""
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    out = tg.exclude_self_value(y, v)
    assert out.shape == y.shape
    v_per_head = v.repeat_interleave(2, dim=2)  # heads 0,1 share kv head 0; heads 2,3 share kv head 1
    torch.testing.assert_close((out * v_per_head).sum(-1), torch.zeros(2, 5, 4), atol=1e-5, rtol=0)
    unit = v_per_head / v_per_head.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, y - (y * unit).sum(-1, keepdim=True) * unit, atol=1e-5, rtol=1e-5)


def test_model_config_round_trip():
    """model_config holds exactly the GPT constructor's arguments, so GPT(**config) rebuilds the model."""
    args = tg.Hyperparameters(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, xsa_last_n=1,
                              bigram_buckets=64, bigram_dim=16, train_seq_len=64, vocab_size=320)
    config = tg.model_config(args, BOS)
    assert set(config) == set(tg.MODEL_FIELDS) | {"max_seq_len", "bos_id"}
    assert config["max_seq_len"] == 64 and config["bos_id"] == BOS
    model = tg.GPT(**config)
    assert len(model.blocks) == 2 and model.tok_emb.weight.shape == (320, 64)
    assert [b.attn.xsa for b in model.blocks] == [False, True]


def test_layer_order():
    """Depth recurrence: the looped segment repeats 1 + num_loops times in place (R6-R8's 17 passes)."""
    assert tg.layer_order(11, 0, 3, 5) == list(range(11))
    assert tg.layer_order(11, 2, 3, 5) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert tg.layer_order(4, 1, 0, 0) == [0, 0, 1, 2, 3]


@torch.no_grad()
def test_depth_recurrence_model():
    """A looped model runs its extra passes from construction (the exported model always does), can
    switch them off (early training), sizes the U-Net skips for the longer order, and counts the
    extra passes in its FLOPs (bench/train_step.py's counter); the extra passes change the output."""
    model = tiny_model(seed=0, num_layers=4, xsa_last_n=0, num_loops=1, loop_start=1, loop_end=2)
    assert model.looping and model.orders[True] == [0, 1, 2, 1, 2, 3] and model.orders[False] == [0, 1, 2, 3]
    assert model.skip_weights.shape == (3, 64)  # 6 passes: 3 encoder, 3 decoder
    x = torch.randint(3, 320, (1, 16))
    looped = model(x)
    model.looping = False
    plain = model(x)
    assert not torch.allclose(looped, plain, atol=1e-4)
    block = sum(p.numel() for p in tg.linear_weights(model.blocks[1]))
    extra = step_bench.matmul_flops_per_token(model, 64, True) - step_bench.matmul_flops_per_token(model, 64, False)
    assert extra == 6.0 * 2 * block + 6.0 * 2 * 64 * 64


def test_gpt_skip_connections_and_flops():
    """U-Net: the first num_layers//2 blocks feed the mirrored later blocks; FLOPs count 6 x matrices."""
    model = tiny_model(seed=0, num_layers=5, xsa_last_n=0)
    assert model.orders[model.looping] == [0, 1, 2, 3, 4] and model.skip_weights.shape == (3, 64)
    matrices = sum(p.numel() for p in tg.linear_weights(model)) + model.tok_emb.weight.numel()
    assert step_bench.matmul_flops_per_token(model, 64, False) == 6.0 * matrices + 6.0 * 5 * 64 * 64
    # the Linear weights are those of the 5 blocks (6 each) plus the bigram projection
    assert len(tg.linear_weights(model)) == 5 * 6 + 1
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randint(3, 320, (1, 16)), torch.randint(3, 320, (1, 16)))))
