"""The padded per-document LoRA TTT that the packed one replaced (train_gpt.py before branch lora-packed), kept
verbatim as the reference of tests/test_lora_ttt.py: one window per batch row at the row start, padded with token 0,
one adapter per row (batched matmuls), dense causal attention. `padded_scores` runs it without compile or deadline."""
from __future__ import annotations

import heapq

import torch
import torch.nn as nn

from conftest import tg


def padded_schedule(starts: torch.Tensor, lengths: torch.Tensor, rows: int, chunk: int, seq_len: int) -> torch.Tensor:
    """Which chunk of which document each of `rows` batch rows processes at each step. Documents start in stream order,
    never reordered (R6 sorts them by length): the first `rows` start together, then each takes the row that frees first
    (lowest index on ties), so no row waits for the longest document of a group. Chunk k of a document of n targets
    scores targets k*chunk .. min((k+1)*chunk, n)-1 of it, reading the document's latest <= seq_len tokens up to its
    end. Returns plan (steps, rows, 5) int64: the window's first input position, its length (0: idle row), its first
    scored offset, 1 if the step trains on the chunk (all but a document's last), 1 if the row starts a document."""
    chunks, free, first, row = (lengths + chunk - 1) // chunk, [(0, r) for r in range(rows)], [], []
    for c in chunks.tolist():
        t, r = heapq.heappop(free)
        first.append(t)
        row.append(r)
        heapq.heappush(free, (t + c, r))
    doc = torch.repeat_interleave(torch.arange(len(chunks)), chunks)
    k = torch.arange(len(doc)) - torch.repeat_interleave(chunks.cumsum(0) - chunks, chunks)
    hi = torch.minimum((k + 1) * chunk, lengths[doc])
    lo, step = (hi - seq_len).clamp_min(0), torch.tensor(first, dtype=torch.int64)[doc] + k
    plan = torch.zeros(int(step.max()) + 1 if len(doc) else 0, rows, 5, dtype=torch.int64)
    plan[step, torch.tensor(row, dtype=torch.int64)[doc]] = torch.stack(
        (starts[doc] + lo, hi - lo, k * chunk - lo, (k < chunks[doc] - 1).long(), (k == 0).long()), 1)
    return plan


class PaddedLoRALinear(nn.Module):
    """A frozen linear layer plus one adapter per batch row (LoRA, Hu et al. 2021): x (G, T, in) -> base(x) + (x @ a_g)
    @ b_g with a (G, in, r), b (G, r, out); `lora_step`'s learning rate absorbs LoRA's alpha / r. With base None, the
    adapter's term alone (the tied output layer's)."""

    def __init__(self, base: nn.Linear | None, a: nn.Parameter, b: nn.Parameter):
        super().__init__()
        self.base, self.a, self.b = base, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x @ self.a.to(x.dtype)) @ self.b.to(x.dtype)
        return delta if self.base is None else self.base(x) + delta


class PaddedDocumentLoRA:
    """Rank-r adapters on every block linear layer (attention q, k, v, proj; MLP fc, proj) and the tied output layer of
    a frozen model, one per batch row, installed as LoRALinear wrappers until `remove`. All layers' A then B of row g
    are views of row g of one (G, P) tensor, as are Adam's second moments, so resetting or updating rows is one
    masked op over all layers. A fresh adapter is `init`: A uniform in +-1/sqrt(in) from a fixed seed (the same for
    every document), B zero."""

    def __init__(self, model: tg.GPT, rows: int, rank: int, device: torch.device):
        self.model, self.layers = model, [(m, name, lin) for block in model.blocks for m in (block.attn, block.mlp)
                                          for name, lin in m.named_children() if isinstance(lin, nn.Linear)]
        model.requires_grad_(False)
        dims = [(lin.in_features, lin.out_features) for _, _, lin in self.layers]
        self.layers.append((model, "head_lora", None))
        dims.append(tuple(model.tok_emb.weight.shape[::-1]))
        sizes = [(d_in * rank, rank * d_out) for d_in, d_out in dims]
        self.weights = torch.zeros(rows, sum(map(sum, sizes)), device=device)
        self.v, self.steps = torch.zeros_like(self.weights), torch.zeros(rows, 1, device=device)
        self.params, init, offset = [], [], 0
        gen = torch.Generator().manual_seed(0)
        for (m, name, lin), (d_in, _), (size_a, size_b) in zip(self.layers, dims, sizes):
            a = nn.Parameter(self.weights[:, offset : offset + size_a].view(rows, d_in, rank))
            b = nn.Parameter(self.weights[:, offset + size_a : offset + size_a + size_b].view(rows, rank, -1))
            setattr(m, name, PaddedLoRALinear(lin, a, b))
            init += [(torch.rand(size_a, generator=gen) * 2 - 1) * d_in**-0.5, torch.zeros(size_b)]
            self.params, offset = self.params + [a, b], offset + size_a + size_b
        self.init = torch.cat(init).to(device)

    def reset(self, rows: torch.Tensor) -> None:
        """Fresh adapters and Adam state for the rows where `rows` (G,) bool is set."""
        self.weights.copy_(torch.where(rows[:, None], self.init, self.weights))
        self.v.masked_fill_(rows[:, None], 0.0)
        self.steps.masked_fill_(rows[:, None], 0.0)

    def update(self, grads: list[torch.Tensor], train: torch.Tensor, lr: float) -> None:
        """One Adam step (beta1 0, bias-corrected beta2) per row, rows counted by train (G,) 0/1."""
        g = torch.cat([x.flatten(1) for x in grads], 1)
        self.steps += train[:, None]
        self.v.mul_(tg.LORA_BETA2).addcmul_(g, g, value=1 - tg.LORA_BETA2)
        v_hat = self.v / (1 - tg.LORA_BETA2**self.steps).clamp_min(1 - tg.LORA_BETA2)
        self.weights.sub_(lr * g / (v_hat.sqrt() + 1e-8))

    def remove(self) -> None:
        for m, name, lin in self.layers:
            setattr(m, name, lin)
        self.model.requires_grad_(True)


def padded_step(model_fn, lora: PaddedDocumentLoRA, tokens: torch.Tensor, plan: torch.Tensor, width: int,
                board: tg.ScoreBoard, adapting: bool, lr: float) -> None:
    """One step of every row (plan (G, 5) as in lora_schedule): reset the rows that start a document, score each row's
    chunk into board, then, if adapting, one Adam step per row on the mean loss of its chunk unless that is its
    document's last. The scores come from this step's forward, before the update that uses them. Each window sits at
    the start of a (G, width) row padded with token 0 (causal attention: padding never reaches it); no host sync."""
    start, length, score_from, train, reset = plan.unbind(1)
    i = torch.arange(width, device=tokens.device)
    real = i < length[:, None]
    pos = torch.where(real, start[:, None] + i, 0)
    x, y = torch.where(real, tokens[pos], 0), torch.where(real, tokens[pos + 1], 0)
    scored = real & (i >= score_from[:, None])
    lora.reset(reset.bool())
    with tg.autocast(tokens.device):
        nll = model_fn(x, y, "none").float()
    board.add(pos.flatten(), nll.detach().flatten(), scored.flatten())
    if adapting:
        weight = (scored & train.bool()[:, None]) / scored.sum(1, keepdim=True).clamp_min(1)
        lora.update(torch.autograd.grad((nll * weight).sum(), lora.params), train, lr)


def padded_scores(model: tg.GPT, tokens: torch.Tensor, rows: int, chunk: int, seq_len: int, rank: int,
                  lr: float) -> torch.Tensor:
    """Per-target NLL of the padded pass on one rank (evaluate_ttt before packing, eager, never past a deadline)."""
    starts, lengths = tg.document_spans(tokens, model.bos_id)
    plan = padded_schedule(starts, lengths, rows, chunk, seq_len)
    board, lora = tg.ScoreBoard(tokens.numel() - 1, tokens.device), PaddedDocumentLoRA(model, rows, rank, tokens.device)
    try:
        for step in plan:
            padded_step(model, lora, tokens, step, seq_len, board, True, lr)
    finally:
        lora.remove()
    return board.nll
