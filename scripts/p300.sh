#!/usr/bin/env bash
# P300 proxy run (shared/BENCHMARK.md): one GPU does exactly one rank's share of the 8-GPU job,
# for half the time: 98,304 tokens per step, 300 s of training, the full stand-in val set,
# eval budget 410 s (600 s x 5.31 / 7.75). Extra VAR=value arguments override anything.
#   usage: [VOCAB=1024] scripts/p300.sh [VAR=value ...]   (prints the results-table row at the end)
# VOCAB picks the stand-in's tokenization: 8192 (the default, as train_gpt.py) or 1024.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
VOCAB=${VOCAB:-8192}
DATA=${DATA:-./data/bench_sp$VOCAB}
if [ ! -f "$DATA/fineweb_val_000000.bin" ]; then
  python3 "$SHARED/data/unpack.py" "$DATA" --vocab "$VOCAB" --train-shards 7
fi
env DATA_PATH="$DATA" TOKENIZER_PATH="$DATA/fineweb_${VOCAB}_bpe.model" VOCAB_SIZE="$VOCAB" \
  TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=300 EVAL_MAX_SECONDS=410 \
  MUON_MOMENTUM_WARMUP_STEPS=750 "$@" python3 train_gpt.py
python3 scripts/table_row.py "${LOG_PATH:-train_log.txt}"
