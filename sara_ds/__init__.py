"""sara_ds: importance-sampled low-rank optimizers (SARA) for DeepSpeed and Megatron pretraining."""
from .config import PRESET_PAPERS, PRESETS
from .groups import param_groups
from .optim import OPTIMIZERS, SaraAdafactor, SaraAdamMini, SaraAdamW, SaraOptimizer

__version__ = "0.1.0"
__all__ = ["SaraAdamW", "SaraAdafactor", "SaraAdamMini", "SaraOptimizer", "param_groups", "PRESETS",
           "PRESET_PAPERS", "OPTIMIZERS"]

from .integrations.deepspeed import register as _register_with_deepspeed

_register_with_deepspeed()  # cheap: sets torch.optim.SaraAdamW etc.; imports nothing from deepspeed
