#!/usr/bin/env bash
# The README's main job on a laptop CPU: build a corpus from CPython's docs (offline), train a
# SentencePiece tokenizer, preprocess to Megatron's indexed format, then train the built-in tiny
# model with tensor parallel 2 x pipeline parallel 2 on 4 processes, with validation and
# TensorBoard logs, a passkey retrieval grid and a checkpoint every 50 iterations (the checkpoint
# written in the background); then generate a short continuation from the last checkpoint on one
# process (resharded from TP2 x PP2 on load).
# Finishes in a few minutes on 2 cores. Override with environment variables:
#   WORKDIR (default runs/tiny-cpu)  TRAIN_ITERS (150)  SEQ_LENGTH (512)  VOCAB (2000)  NPROC (4)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-runs/tiny-cpu}
TRAIN_ITERS=${TRAIN_ITERS:-150}
SEQ_LENGTH=${SEQ_LENGTH:-512}
VOCAB=${VOCAB:-2000}
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORKDIR"

"$PYTHON" -m longctx_megatron.data.builtin_corpus "$WORKDIR/corpus.jsonl"
"$PYTHON" tools/train_tokenizer.py --input "$WORKDIR/corpus.jsonl" --json-keys text \
    --model-prefix "$WORKDIR/tokenizer" --vocab-size "$VOCAB" --model-type bpe
"$PYTHON" tools/preprocess_data.py --input "$WORKDIR/corpus.jsonl" --json-keys text \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORKDIR/tokenizer.model" \
    --output-prefix "$WORKDIR/corpus" --workers 2 --append-eod --log-interval 1000

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_longctx.py \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2 \
    --ffn-hidden-size 352 --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --hidden-dropout 0 --attention-dropout 0 \
    --attention-layout sliding:2,dilated:1,full:1 --sliding-window 128 --global-every 64 \
    --dilated-window 64 --dilation 2 --max-position-embeddings 4096 \
    --seq-length "$SEQ_LENGTH" --micro-batch-size 2 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 5 --lr-decay-style cosine --clip-grad 1.0 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
    --data-path "$WORKDIR/corpus_text_document" --split 95,5,0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORKDIR/tokenizer.model" \
    --data-cache-path "$WORKDIR/index-cache" \
    --log-interval 10 --eval-interval 50 --eval-iters 2 --tensorboard-dir "$WORKDIR/tensorboard" \
    --eval-longctx-interval 50 --eval-longctx-tasks passkey \
    --save "$WORKDIR/checkpoints" --save-interval 50 --keep-last 2 --async-save

"$PYTHON" tools/generate.py --load "$WORKDIR/checkpoints" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORKDIR/tokenizer.model" \
    --prompt "The Python interpreter" --max-new-tokens 40 --temperature 0.8 --top-k 20 --seed 1
