#!/usr/bin/env bash
# Same results on 1, 2 and 4 GPUs (README: "Several GPUs").
#   usage: scripts/multi_gpu_check.sh DATA_DIR OUT_DIR [GPU counts, default "1 2 4"]
# 1. trains 50 steps of the same global batch (393,216 tokens) on each GPU count; gradient
#    accumulation makes up the rest (4 micro-batches on 1 GPU, 2 on 2, 1 on 4);
# 2. evaluates the 1-GPU artifact with EVAL_ONLY=1 (sliding + score-first TTT) on each count;
# 3. prints the comparison (scripts/compare_runs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$1; OUT=$2; shift 2
GPUS=${*:-1 2 4}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
VOCAB=${VOCAB:-1024}  # the tokenizer DATA_DIR was made with (DATA_DIR/fineweb_${VOCAB}_bpe.model)
export DATA_PATH=$DATA TOKENIZER_PATH=$DATA/fineweb_${VOCAB}_bpe.model VOCAB_SIZE=$VOCAB
export TRAIN_BATCH_TOKENS=393216 ITERATIONS=50 LOG_EVERY=1
for n in $GPUS; do
  env TTT_ENABLED=0 LOG_PATH="$OUT/train_${n}gpu.txt" ARTIFACT="$OUT/model_${n}gpu.ptz" \
    SUBMISSION_PATH="$OUT/submission_${n}gpu.json" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" train_gpt.py > /dev/null
done
first=$(echo "$GPUS" | awk '{print $1}')
for n in $GPUS; do
  env EVAL_ONLY=1 ARTIFACT="$OUT/model_${first}gpu.ptz" LOG_PATH="$OUT/eval_${n}gpu.txt" \
    SCORES_PATH="$OUT/scores_${n}gpu.npy" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" train_gpt.py > /dev/null
done
python3 scripts/compare_runs.py "$OUT" $GPUS
