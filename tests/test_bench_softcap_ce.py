"""bench/softcap_ce.py's chunked variant (hand-written gradients, computed in the forward) against autograd through
train_gpt's head + soft-cap + cross-entropy, on CPU: loss, dx and dW, with a ragged last chunk and a non-unit
incoming gradient."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("softcap_ce", REPO_ROOT / "bench" / "softcap_ce.py")
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_matches_reference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 40, 16, generator=gen).to(dtype)
    w0 = 2.0 * torch.randn(50, 16, generator=gen)  # logits of std ~8: the cap (5 here) bends most of them
    t = torch.randint(0, 50, (3, 40), generator=gen)
    results = []
    for fn in (lambda x, w: sc.head_loss(x, w, t, 5.0), lambda x, w: sc.chunked_softcap_ce(x, w, t, 5.0, chunk=37)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w)
        (0.5 * loss).backward()
        results.append((loss.detach(), x.grad.float(), w.grad))
    (ref_loss, ref_dx, ref_dw), (loss, dx, dw) = results
    assert dw.dtype == torch.float32  # the fp32 master weight's gradient
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in ((dx, ref_dx), (dw, ref_dw)):  # a dropped tanh factor errs by ~1.4
        assert ((got - ref).norm() / ref.norm()).item() < tol
