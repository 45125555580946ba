#!/usr/bin/env bash
# The design's 7B model (32 layers: 16 sliding+global, 12 dilated, 4 full; GQA 32/8; 5.8B
# parameters) at a 100K-token context on one 8-GPU node: tensor parallel 8 with sequence
# parallelism, bf16 with fp32 master weights sharded by the distributed optimizer, selective
# recomputation. Checkpoints go to $OUT/checkpoints every 500 iterations, written in the
# background; re-running the script (or torchrun restarting it) resumes from the newest one, and
# SIGTERM/SIGUSR1 (preemption) saves before exiting. Prepare DATA (a Megatron indexed dataset prefix) and TOKENIZER (a SentencePiece
# model) first, e.g. with tools/train_tokenizer.py and tools/preprocess_data.py.
#   DATA=/data/corpus_text_document TOKENIZER=/data/tok.model bash examples/pretrain_longctx_7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to the indexed dataset prefix (…_text_document)}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece .model file}"
OUT=${OUT:-runs/7b-100k}

torchrun --standalone --nproc_per_node 8 --max-restarts 3 pretrain_longctx.py \
    --tensor-model-parallel-size 8 --sequence-parallel --bf16 --use-distributed-optimizer \
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --group-query-attention --num-query-groups 8 \
    --ffn-hidden-size 11008 --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --hidden-dropout 0 --attention-dropout 0 \
    --attention-layout sliding:16,dilated:12,full:4 --sliding-window 4096 --global-every 128 \
    --dilated-window 1024 --dilation 4 --max-position-embeddings 102400 \
    --seq-length 102400 --micro-batch-size 1 --global-batch-size 8 \
    --recompute-granularity selective --attention-backend auto \
    --train-iters 50000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --data-path "$DATA" --split 969,30,1 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
    --reset-position-ids --reset-attention-mask --eod-mask-loss \
    --log-interval 1 --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$OUT/tensorboard" \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 500 --keep-last 3 --async-save
