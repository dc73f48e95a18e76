#!/usr/bin/env python3
"""Time R3's training step (PR #549, the 2026-03-23 LeakyReLU_LegalTTT_ParallelMuon record) the way
bench/train_step.py times ours: one GPU, random tokens, one 48 x 2048 micro-batch (the P300 shape).

usage: python3 bench/r3_step.py PATH/TO/records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon/train_gpt.py
       [--steps 30]
The record file is imported unmodified. FlashAttention-3 is not installed here, so its
`flash_attn_interface.flash_attn_func` is supplied by train_gpt.causal_attention (SDPA, cuDNN first),
the kernel our own step uses. The model, dtypes, parameter banks and optimizers are built as the
record's main() builds them with its P300 settings (11 layers, bigram 1536, XSA on the last 4 layers,
value embeddings on layers 9-10); a step is forward+backward, gradient clipping, Muon and Adam, and the
EMA update. Prints median ms for the full step, forward+backward alone and the optimizers + EMA alone.
Needs a CUDA GPU.
"""
import argparse
import importlib.util
import os
import sys
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt as tg  # noqa: E402
from train_step import timed  # noqa: E402

R3_P300 = {"NUM_LAYERS": "11", "BIGRAM_VOCAB_SIZE": "1536", "XSA_LAST_N": "4", "ROPE_DIMS": "16", "LN_SCALE": "1",
           "VE_ENABLED": "1", "VE_DIM": "128", "VE_LAYERS": "9,10", "MUON_WD": "0.04", "ADAM_WD": "0.04",
           "MATRIX_LR": "0.025", "SCALAR_LR": "0.025", "TIED_EMBED_LR": "0.035", "MUON_MOMENTUM": "0.99"}


def load_r3(path: str) -> types.ModuleType:
    """Import the record file with an SDPA stand-in for FA3's flash_attn_func (q, k, v: (B, T, H, D))."""
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_func = lambda q, k, v, causal: tg.causal_attention(q, k, v)
    sys.modules["flash_attn_interface"] = fa3
    for key, value in R3_P300.items():
        os.environ.setdefault(key, value)
    spec = importlib.util.spec_from_file_location("r3_record", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(r3: types.ModuleType, dev: torch.device):
    """R3's GPT, its dtype setup (bf16 model, fp32 banks, linears and control tensors), its three optimizers."""
    a = r3.Hyperparameters()
    model = r3.GPT(vocab_size=a.vocab_size, num_layers=a.num_layers, model_dim=a.model_dim, num_heads=a.num_heads,
                   num_kv_heads=a.num_kv_heads, mlp_mult=a.mlp_mult, tie_embeddings=a.tie_embeddings,
                   tied_embed_init_std=a.tied_embed_init_std, logit_softcap=a.logit_softcap, rope_base=a.rope_base,
                   qk_gain_init=a.qk_gain_init, bigram_vocab_size=a.bigram_vocab_size, bigram_dim=a.bigram_dim,
                   xsa_last_n=a.xsa_last_n, rope_dims=a.rope_dims, ln_scale=a.ln_scale, ve_enabled=a.ve_enabled,
                   ve_dim=a.ve_dim, ve_layers=a.ve_layers).to(dev).bfloat16()
    banks = [model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank]
    for bank in banks:
        bank.data = bank.data.float()
    for module in model.modules():
        if isinstance(module, r3.CastedLinear):
            module.float()
    r3.restore_low_dim_params_to_fp32(model)
    in_banks = {id(p) for p in banks}
    embeddings = [p for n, p in model.named_parameters() if n.endswith("embed.weight") or n == "tok_emb.weight"]
    in_embeddings = {id(p) for p in embeddings}
    scalars = [p for p in model.parameters() if id(p) not in in_banks | in_embeddings]
    muon = r3.Muon(banks, lr=a.matrix_lr, momentum=a.muon_momentum, backend_steps=a.muon_backend_steps,
                   weight_decay=a.muon_wd)
    adam_tok = torch.optim.AdamW(embeddings, lr=a.tied_embed_lr, betas=(a.beta1, a.beta2), eps=a.adam_eps,
                                 weight_decay=a.adam_wd, fused=True)
    adam_scalar = torch.optim.AdamW(scalars, lr=a.scalar_lr, betas=(a.beta1, a.beta2), eps=a.adam_eps,
                                    weight_decay=a.adam_wd, fused=True)
    return a, model, muon, [adam_tok, adam_scalar]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("record", help="the R3 record's train_gpt.py")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    r3 = load_r3(args.record)
    a, model, muon, adams = build(r3, dev)
    net = torch.compile(model, dynamic=False, fullgraph=True)
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    seqs = 98_304 // a.train_seq_len

    def forward_backward():
        r = torch.randint(0, a.vocab_size, (seqs, a.train_seq_len + 1), device=dev)
        with tg.autocast(dev):  # bf16 autocast + cuDNN-first SDPA, as train_gpt runs
            net(r[:, :-1], r[:, 1:]).backward()

    def optimizers_and_ema():  # the order of R3's training loop
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip_norm)
        muon.launch_reduce_scatters()
        for opt in adams:
            opt.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                ema[name].mul_(0.997).add_(t.detach().float(), alpha=0.003)

    def step():
        forward_backward()
        optimizers_and_ema()

    def optimizers_only():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizers_and_ema()

    for _ in range(10):
        step()
    full = timed(step, args.steps)
    fwd_bwd = timed(lambda: (forward_backward(), model.zero_grad(set_to_none=True)), args.steps)
    opt_ms = timed(optimizers_only, args.steps)
    print(f"R3 tokens/step {seqs * a.train_seq_len}  params {sum(p.numel() for p in model.parameters())}")
    print(f"R3 full step {full:.2f} ms  forward+backward {fwd_bwd:.2f} ms  optimizers+EMA {opt_ms:.2f} ms")


if __name__ == "__main__":
    main()
