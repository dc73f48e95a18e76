"""bench/lora_packing.py: what packing saves in the LoRA TTT pass, on CPU, before any GPU time. For each chunk size it
prints rank_lora_plan's steps, row-tokens computed (steps x rows x TRAIN_SEQ_LEN), window tokens (the real ones) and
their ratio, for the padded layout (one window per row: no window shareable, rows = documents in flight = 64, which
is the pre-packing schedule) and packed layouts (rows, documents in flight). Whole stream, one rank.

    python3 bench/lora_packing.py [DATA_GLOB] [VOCAB]   # default: data/bench_sp1024/fineweb_val_*.bin 1024"""
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

SEQ, BOS = 2048, 1
LAYOUTS = [("padded", 64, 64), ("packed", 64, 128), ("packed", 48, 128), ("packed", 32, 96), ("packed", 32, 64)]

pattern = sys.argv[1] if len(sys.argv) > 1 else "data/bench_sp1024/fineweb_val_*.bin"
tokens = tg.load_validation_tokens(pattern, SEQ, int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
starts, lengths = tg.document_spans(tokens, BOS)
print(f"{tokens.numel() - 1:,} targets, {len(starts):,} documents")
for chunk in (48, 64, 96):
    for name, rows, docs in LAYOUTS:
        args = tg.Hyperparameters(train_seq_len=SEQ, ttt_lora_chunk=chunk, ttt_lora_rows=rows, ttt_lora_docs=docs)
        model = types.SimpleNamespace(bos_id=BOS, doc_mask=name == "packed")  # no mask: one window per row
        plan = tg.rank_lora_plan(tokens, model, args, tg.Runtime(0, 1, 0, torch.device("cpu")))[1]
        computed, real = len(plan) * rows * SEQ, int(plan[:, :, 1].sum())
        print(f"chunk {chunk:3d} {name} rows {rows:3d} docs {docs:3d}: steps {len(plan):5d}  row-tokens "
              f"{computed / 1e6:6.1f} M  window tokens {real / 1e6:6.1f} M  real {real / computed:5.1%}")
