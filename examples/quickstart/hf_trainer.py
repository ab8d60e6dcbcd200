"""Hugging Face Trainer: SaraAdamW from the DeepSpeed config Trainer is given, on a small Llama.

    deepspeed --num_gpus 1 examples/quickstart/hf_trainer.py
"""
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import sara_ds  # noqa: F401  (registers SaraAdamW for the config's optimizer.type)
from sara_ds.integrations import deepspeed as sara_deepspeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_loop import batch  # noqa: E402  (the plain PyTorch quick-start's learnable sequences)


class Sequences(torch.utils.data.Dataset):
    def __len__(self):
        return 800

    def __getitem__(self, i):
        tokens = batch(i)[0]
        return {"input_ids": tokens, "labels": tokens}


sara_deepspeed.prepare_cpu_launch()  # skips DeepSpeed's CPU-only JIT build of an op training never uses; no-op on GPUs
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64))
args = TrainingArguments(output_dir="hf_out", deepspeed=os.path.join(os.path.dirname(__file__), "hf_trainer.json"),
                         per_device_train_batch_size=8, learning_rate=3e-3, max_steps=100, logging_steps=50,
                         report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
trainer = Trainer(model=model, args=args, train_dataset=Sequences())
result = trainer.train()
optimizer = trainer.model_wrapped.optimizer.optimizer  # the SaraAdamW that ZeRO wraps
print(f"mean training loss {result.training_loss:.3f}; {type(optimizer).__name__}, {optimizer.refresh_counts()}")
