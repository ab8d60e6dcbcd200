"""Hugging Face Trainer with FSDP2 (accelerate's ``fsdp_version: 2``) and a SARA optimizer.

    torchrun --nproc_per_node 8 examples/hf_trainer_fsdp2.py --steps 200

The optimizer is built from the plain model and handed to Trainer (``optimizers=(optimizer, None)``).
accelerate shards the model afterwards and swaps the DTensors into the optimizer's param groups; sara_ds
takes them over at its first step (``Layout.adopt``), with the FSDP2 layout. accelerate turns FSDP on only
on GPU-like devices: on a CPU the same script trains with plain DDP (the plugin is ignored), which the last
line reports as the layout.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import sara_ds  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random sequences (this recipe is about the wiring; examples/train.py trains on real text)."""

    def __init__(self, vocab: int, length: int, count: int = 256):
        self.vocab, self.length, self.count = vocab, length, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        tokens = torch.randint(0, self.vocab, (self.length,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": tokens, "labels": tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--update_proj_gap", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    groups = sara_ds.param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=0.25)
    optimizer = sara_ds.SaraAdamW(groups, lr=args.lr, preset="sara")
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=args.steps, learning_rate=args.lr,
        logging_steps=max(1, args.steps // 4), report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(256, 32), optimizers=(optimizer, None))
    result = trainer.train()
    if trainer.args.process_index == 0:
        print(f"[sara_ds] HF Trainer: layout {type(optimizer.layout).__name__}, refreshes "
              f"{optimizer.refresh_counts()['refreshes']} on rank 0, final train loss {result.training_loss:.4f}",
              flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
