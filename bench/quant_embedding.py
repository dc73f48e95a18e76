#!/usr/bin/env python3
"""Quantize one trained model two ways and score both: the tied embedding by GPTQ with the output
head's Hessian, or rounded to nearest (everything else identical, both fitted to 16 MB).

usage: DATA_PATH=... TOKENIZER_PATH=... TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=200 \
       LOG_PATH=quant_embedding.txt python3 bench/quant_embedding.py
One GPU; the model, data and schedule come from train_gpt.py's environment variables. Prints the
float model's val_bpb and each variant's step scale and round-trip val_bpb (non-overlapping windows).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def main() -> None:
    args, overrides = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    log = tg.Logger(args.log_path or "quant_embedding.txt", True)
    tg.log_run_header(log, args, overrides, rt, open(tg.__file__, "rb").read())
    torch.manual_seed(args.seed)
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    val = tg.load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.train_seq_len,
                                    args.vocab_size)
    bytes_per_target, val = tg.target_bytes(val, tg.byte_tables(sp)), val.to(rt.device)
    model = tg.GPT(**tg.model_config(args, sp.bos_id())).to(rt.device)
    loader = tg.TokenLoader(os.path.join(args.data_path, "fineweb_train_*.bin"), args.train_seq_len,
                            args.train_batch_tokens // args.train_seq_len, rt, args.seed, args.vocab_size)
    *_, ema = tg.train(args, model, loader, rt, 1, log, args.max_wallclock_seconds - args.gptq_reserve_seconds)
    ema.copy_to_model()
    hessians = tg.collect_hessians(model, loader, args.gptq_calib_batches, rt)
    config = tg.model_config(args, sp.bos_id())
    max_bytes = tg.ARTIFACT_LIMIT_BYTES - 1 - os.path.getsize(tg.__file__)
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_fn = tg.maybe_compile(model, rt.device)

    def score(tag: str) -> None:
        loss, bpb, _ = tg.evaluate(model_fn, val, bytes_per_target, args.train_seq_len, args, rt)
        log(f"{tag} val_loss {loss:.6f} val_bpb {bpb:.6f}")

    score("pre_quant")
    without_head = {k: v for k, v in hessians.items() if k != "tok_emb.weight"}
    for tag, h in (("emb_gptq", hessians), ("emb_rtn", without_head)):
        t = time.perf_counter()
        groups, small = tg.matrix_groups(float_state, h), tg.quantize_small_tensors(float_state)
        entries, alpha = tg.quantize_to_fit(groups, small, config, max_bytes)
        model.load_state_dict(tg.dequantize_entries(entries))
        score(f"{tag} step_scale {alpha:.4f} quant_s {time.perf_counter() - t:.1f}")


if __name__ == "__main__":
    main()
