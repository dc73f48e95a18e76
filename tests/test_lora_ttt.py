"""Per-document score-first LoRA test-time training (R6 PR #1667 / R7 PR #1530) keeps every rule of the legality
checklist: each target scored once, before any update that used it; documents in stream order, independent of each
other; causal; the deadline stops adaptation; the compile warm-up sees random tokens only and compiles one graph, and
the pass then never recompiles. Tiny models on CPU."""
from __future__ import annotations

import copy
import time
import types

import pytest
import torch

from conftest import BOS, CPU, docs_tokens, runtime, tg, tiny_model
from lora_padded_reference import padded_scores

SEQ, CHUNK, ROWS, DOCS = 32, 8, 3, 6


def lora_args(**overrides) -> tg.Hyperparameters:
    kw = dict(vocab_size=320, train_seq_len=SEQ, eval_stride=16, ttt_lora_chunk=CHUNK, ttt_lora_rank=4,
              ttt_lora_rows=ROWS, ttt_lora_docs=DOCS, ttt_lora_lr=0.05)
    args = tg.Hyperparameters(**{**kw, **overrides})
    args.validate()
    return args


def run_lora(model, tokens, args=None, deadline=None):
    """evaluate_ttt on a copy of the model -> (per-target NLL, log lines)."""
    lines = []
    deadline = time.perf_counter() + 1e6 if deadline is None else deadline
    _, _, board = tg.evaluate_ttt(copy.deepcopy(model), tokens, torch.ones(tokens.numel() - 1), args or lora_args(),
                                  runtime(), lines.append, deadline)
    return board.nll, lines


@pytest.fixture(scope="module")
def stream(tokenizer):
    """~900 targets of generated documents (5-70 tokens, some over SEQ), starting with a partial document (the stream
    does not begin with BOS) and ending inside one."""
    return torch.from_numpy(docs_tokens(tokenizer.sp, 910, seed=5).astype("int64"))[7:]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=8, doc_mask=True)


def plain_window_scores(model, tokens) -> torch.Tensor:
    """Reference for a fresh adapter: each document chunk scored by the plain model on its window (the document's
    latest <= SEQ tokens up to the chunk's end), one window at a time."""
    out = torch.full((tokens.numel() - 1,), float("nan"))
    starts, lengths = tg.document_spans(tokens, BOS)
    with torch.no_grad():
        for s, n in zip(starts.tolist(), lengths.tolist()):
            for k in range(0, n, CHUNK):
                hi = min(k + CHUNK, n)
                lo = max(0, hi - SEQ)
                nll = model(tokens[None, s + lo : s + hi], tokens[None, s + lo + 1 : s + hi + 1], "none")[0]
                out[s + k : s + hi] = nll[k - lo :]
    return out


def test_document_spans_partition_targets(stream):
    starts, lengths = tg.document_spans(stream, BOS)
    assert int(starts[0]) == 0 and stream[0] != BOS and int(lengths.sum()) == stream.numel() - 1
    assert torch.equal(starts[1:], starts[:-1] + lengths[:-1]) and bool((stream[starts[1:]] == BOS).all())
    assert int((stream[:-1] == BOS).sum()) == len(starts) - 1 and int(lengths.max()) > SEQ


def schedule(stream):
    """rank_lora_plan's plan of the whole stream (one rank) under the document mask."""
    return tg.rank_lora_plan(stream, types.SimpleNamespace(bos_id=BOS, doc_mask=True), lora_args(), runtime())[1]


def test_schedule_keeps_stream_order_and_covers_every_target_once(stream):
    """Documents start in stream order (the first together), each runs its chunks in order in one adapter slot that no
    other document in flight holds, starting with a reset and training on every chunk but its last; the scored
    offsets cover every target exactly once, each window lies inside its document, is at most SEQ long and inside one
    row, windows of a step do not overlap and come in layout order (empty slots last), and a window that does not
    start a row starts with BOS. Packing happens: some row holds several windows."""
    starts, lengths = tg.document_spans(stream, BOS)
    plan = schedule(stream)
    count, owner, shared = torch.zeros(stream.numel() - 1, dtype=torch.int64), {}, 0
    first_step, last_k = {}, {}
    for t, step in enumerate(plan.tolist()):
        real = [w for w in step if w[1] > 0]
        assert step[len(real):] == [[0, 0, 0, 0, 0, ROWS * SEQ, DOCS]] * (DOCS - len(real))
        assert [w[5] for w in real] == sorted(w[5] for w in real)
        for (pos, w, frm, train, reset, off, slot), nxt in zip(real, real[1:] + [None]):
            d = int(torch.searchsorted(starts, torch.tensor(pos), right=True)) - 1
            s, n = int(starts[d]), int(lengths[d])
            k = (pos - s + frm) // CHUNK
            assert s <= pos and pos + w <= s + n and 0 < w <= SEQ and off // SEQ == (off + w - 1) // SEQ
            assert nxt is None or off + w <= nxt[5]
            assert off % SEQ == 0 or stream[pos] == BOS
            shared += off % SEQ > 0
            assert k == last_k.get(d, -1) + 1 and reset == (k == 0) and train == (k < -(-n // CHUNK) - 1)
            assert owner.setdefault(slot, d) == d and 0 <= slot < DOCS
            if not train:
                del owner[slot]
            first_step.setdefault(d, t)
            last_k[d] = k
            count[pos + frm : pos + w] += 1
    firsts = [first_step[d] for d in range(len(starts))]
    assert firsts == sorted(firsts) and firsts[0] == 0
    assert not owner and shared > 0 and bool((count == 1).all())


def test_fresh_adapters_score_like_the_plain_model(stream, model):
    """With LR 0 every target's score is the plain model's on its document window, so the windows, the padding and the
    per-row batching are right; with a real LR each document's first chunk (scored before any update) still is, and
    later chunks differ (adaptation happens)."""
    reference = plain_window_scores(model, stream)
    frozen, _ = run_lora(model, stream, lora_args(ttt_lora_lr=0.0))
    torch.testing.assert_close(frozen, reference, rtol=1e-5, atol=1e-5)
    adapted, lines = run_lora(model, stream)
    assert any(line.startswith(f"ttt documents {len(tg.document_spans(stream, BOS)[0])} ") for line in lines)
    starts, lengths = tg.document_spans(stream, BOS)
    first = torch.cat([torch.arange(s, s + min(n, CHUNK)) for s, n in zip(starts.tolist(), lengths.tolist())])
    torch.testing.assert_close(adapted[first], reference[first], rtol=1e-5, atol=1e-5)
    later = torch.ones_like(adapted, dtype=torch.bool)
    later[first] = False
    assert (adapted[later] - reference[later]).abs().max() > 0.05


@pytest.mark.parametrize("same_documents", [True, False])
def test_scores_are_causal_and_precede_updates(stream, model, same_documents):
    """Changing every token after target t (mid-chunk, mid-stream) changes no score at or before t: each chunk is scored
    before the update on it (an update first would let t's score see the chunk's later targets). Keeping the BOS
    positions keeps the schedule, and the scores are bit-identical; random tokens move documents between rows, which
    changes only rounding."""
    reference, _ = run_lora(model, stream)
    starts, _ = tg.document_spans(stream, BOS)
    t = int(starts[len(starts) // 2]) + CHUNK + 3
    cut, g = stream.clone(), torch.Generator().manual_seed(4)
    noise = torch.randint(3, 300, (stream.numel() - t - 2,), generator=g)
    cut[t + 2 :] = torch.where(stream[t + 2 :] == BOS, BOS, noise) if same_documents else noise
    nll, _ = run_lora(model, cut)
    if same_documents:
        assert torch.equal(nll[: t + 1], reference[: t + 1])
    else:
        torch.testing.assert_close(nll[: t + 1], reference[: t + 1], rtol=0, atol=1e-5)
    assert (nll[t + 1 :] - reference[t + 1 :]).abs().max() > 0.1


def test_documents_are_independent(stream, model):
    """Rewriting one early document (same length) leaves every other document's scores bit-identical, the later
    documents that reuse its row included (its adapter is reset), and changes its own."""
    reference, _ = run_lora(model, stream)
    starts, lengths = tg.document_spans(stream, BOS)
    d = 2
    s, n = int(starts[d]), int(lengths[d])
    other = stream.clone()
    other[s + 1 : s + n] = torch.randint(3, 300, (n - 1,), generator=torch.Generator().manual_seed(3))
    nll, _ = run_lora(model, other)
    assert torch.equal(nll[:s], reference[:s]) and torch.equal(nll[s + n :], reference[s + n :])
    assert not torch.equal(nll[s : s + n], reference[s : s + n])


def test_deadline_stops_adaptation(stream, model, monkeypatch):
    """Past the deadline, the first check (after LORA_CHECK_EVERY steps) stops adaptation and logs it; every document
    that starts later is scored by fresh, never-updated adapters: exactly the LR 0 scores."""
    monkeypatch.setattr(tg, "LORA_CHECK_EVERY", 2)
    nll, lines = run_lora(model, stream, deadline=time.perf_counter() - 1)
    assert [line for line in lines if line.startswith("ttt_deadline: stopping adaptation after 2 of ")], lines
    assert any(" adapted 2 " in line for line in lines if line.startswith("ttt documents "))
    frozen, _ = run_lora(model, stream, lora_args(ttt_lora_lr=0.0))
    starts, lengths = tg.document_spans(stream, BOS)
    plan = schedule(stream)
    late = int(plan[2:, :, 0][plan[2:, :, 4] == 1].min())  # first position of the first document started at step 2
    assert torch.equal(nll[late:], frozen[late:])
    assert not torch.equal(nll[:late], frozen[:late])
    adapted, _ = run_lora(model, stream)
    assert not torch.equal(adapted[late:], frozen[late:])


def test_compiles_its_graphs_on_random_tokens(stream, monkeypatch):
    """Under torch.compile (dynamic=False; aot_eager on CPU) the warm-up compiles every graph on random tokens only,
    before the first validation step: the blocks' shared attend and feed code (regional compilation; one more attend
    graph for the first block, whose input aliases x0), fewer graphs than blocks. The pass then compiles nothing more,
    its scores match the eager pass, and the blocks are left uncompiled."""
    model = tiny_model(seed=8, doc_mask=True, num_layers=6, xsa_last_n=6, parallel_start=4)  # 3 blocks of each lane
    compiled, calls = [], []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    real_step = tg.lora_step
    monkeypatch.setattr(tg, "maybe_compile", lambda m, device: torch.compile(m, dynamic=False, backend=backend))
    monkeypatch.setattr(tg, "lora_step", lambda *a: calls.append((a[2] is tokens, len(compiled))) or real_step(*a))
    torch._dynamo.reset()
    tokens = stream
    nll, _ = run_lora(model, tokens)
    warm = [n for is_val, n in calls if not is_val]
    assert len(warm) == 1 and not calls[0][0] and all(is_val for is_val, _ in calls[1:])
    assert 2 <= len(compiled) <= 3 < len(model.blocks) and {n for is_val, n in calls if is_val} == {len(compiled)}
    assert not any("attend" in vars(block) or "feed" in vars(block) for block in model.blocks)
    monkeypatch.undo()
    torch._dynamo.reset()
    # bit-equal at LR 0; with the test's LR 0.05 the blocks' separate backward graphs, which sum gradients in another
    # fp32 order, drift by up to 1.5e-4 over a document's steps (9.5e-7 at the default LR 3e-4)
    torch.testing.assert_close(nll, run_lora(model, stream)[0], rtol=1e-4, atol=1e-4)


def test_output_layer_has_an_adapter(stream, model):
    """DocumentLoRA adapts the tied output layer too (R6): fresh adapters (B zero) leave the logits bit-identical, a
    nonzero B of the head's adapter alone moves them, and `remove` takes the adapter away again."""
    m, x = copy.deepcopy(model), stream[:SEQ].view(1, SEQ)
    with torch.no_grad():
        base = m(x)
        lora = tg.DocumentLoRA(m, 1, 2, 4, CPU)
        lora.offs.fill_(x.numel())  # every position in slot 0, whose adapters are fresh (A random, B zero)
        lora.slots.copy_(lora.weights[:2])
        assert torch.equal(m(x), base)
        m.head_lora.b.normal_()
        assert (m(x) - base).abs().max() > 1e-3
    lora.remove()
    assert m.head_lora is None and torch.equal(m(x), base)


def test_model_is_restored(stream, model):
    """The pass leaves the model as it found it: plain linear layers, trainable, the same weights."""
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tg.evaluate_ttt(m, stream, torch.ones(stream.numel() - 1), lora_args(), runtime(), lambda _: None, 1e18)
    assert all(type(lin) is torch.nn.Linear for lin in m.blocks.modules() if "Linear" in type(lin).__name__)
    assert all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("doc_mask", [True, False])
def test_packed_pass_matches_the_padded_one(stream, doc_mask):
    """With a real LR, every target's score equals the padded pass's (the pre-packing implementation, kept in
    lora_padded_reference) to fp32 rounding: the same windows, adapters and Adam steps per document, only laid out
    differently (several windows per row with BOS-segmented attention and grouped matmuls, vs one per row). At LR 0.01
    adaptation moves scores by ~2 nats and the passes agree to 1e-6 (measured); at the tests' LR 0.05 (~3 nats) Adam's
    g / sqrt(v) amplifies rounding to 4e-4. Without DOC_MASK no window shares a row, and the pass still matches."""
    model, lr = tiny_model(seed=8, doc_mask=doc_mask), 0.01
    packed, _ = run_lora(model, stream, lora_args(ttt_lora_lr=lr))
    padded = padded_scores(copy.deepcopy(model), stream, ROWS, CHUNK, SEQ, 4, lr)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert (padded - plain_window_scores(model, stream)).abs().max() > 1.0
