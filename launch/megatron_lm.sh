#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py with SARA, one node of 8 GPUs: TP=2 x DP=4, the distributed optimizer (each
# data-parallel rank owns whole matrices and their state), torch_dist checkpoints that resume at other TP and DP
# sizes. MEGATRON_LM: a Megatron-LM checkout; DATA: a --data-path prefix; TOKENIZER: a tokenizer model.
torchrun --nproc_per_node 8 -m sara_ds.integrations.megatron_launch "$MEGATRON_LM/pretrain_gpt.py" \
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 \
  --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear --bf16 \
  --micro-batch-size 4 --global-batch-size 256 --train-iters 100000 --lr 3e-4 --min-lr 3e-5 \
  --lr-decay-style cosine --lr-warmup-iters 2000 --clip-grad 1.0 --optimizer adam \
  --tensor-model-parallel-size 2 --use-distributed-optimizer --ckpt-format torch_dist \
  --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
  --save ckpt --load ckpt --save-interval 1000 --log-interval 10 \
  --sara-rank 256 --sara-preset sara --sara-update-proj-gap 200 --sara-scale 0.25
