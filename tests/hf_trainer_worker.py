"""Hugging Face Trainer driving DeepSpeed with the shipped configs/ds/sara.json (one process, CPU)."""
import json, os, sys, tempfile
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
CONFIG = sys.argv[2] if len(sys.argv) > 2 else "sara.json"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from sara_bench.precision import native_bf16
import sara_ds
from sara_ds.integrations import deepspeed as sd
import deepspeed
sd.prepare_cpu_launch()
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
cfg = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ds", CONFIG)))
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
class Data(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i); t = torch.randint(0, 128, (16,), generator=g)
        return {"input_ids": t, "labels": t}
p = cfg["optimizer"]["params"]
# The shipped config says "bf16": {"enabled": "auto"}; Trainer fills it from TrainingArguments.bf16, so bf16 only
# where this CPU computes it natively (emulated bf16 is ~50x slower on an AVX2 EPYC), as examples/train.py decides.
bf16 = native_bf16("cpu")[0]
args = TrainingArguments(output_dir=tempfile.mkdtemp(), deepspeed=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ds", CONFIG), per_device_train_batch_size=cfg["train_micro_batch_size_per_gpu"],
    learning_rate=p["lr"], adam_beta1=p["betas"][0], adam_beta2=p["betas"][1], adam_epsilon=p["eps"], weight_decay=p["weight_decay"],
    max_grad_norm=cfg["gradient_clipping"], bf16=bf16, max_steps=cfg["scheduler"]["params"]["total_num_steps"], warmup_steps=cfg["scheduler"]["params"]["warmup_num_steps"], logging_steps=100, report_to=[], save_strategy="no", use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=Data())
out = trainer.train()
opt = trainer.model_wrapped.optimizer
inner = opt.optimizer if hasattr(opt, "optimizer") else opt
print("HF-RESULT", type(inner).__name__, type(opt).__name__, "bf16" if trainer.model_wrapped.bfloat16_enabled() else "fp32", inner.refresh_counts(), sorted(set(n.split(".")[-2] for n in inner.subspace_overlaps())), out.training_loss)
