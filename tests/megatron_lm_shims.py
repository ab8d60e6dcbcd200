"""Test-only: run sara_ds's Megatron-LM launcher on a CPU (Megatron-LM's training loop assumes CUDA throughout)."""
import contextlib
import sys
import types

import torch

from megatron_worker import Stream, install_cpu_shims


def install():
    install_cpu_shims()
    cuda = torch.cuda
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda *a, **k: None
    cuda.is_available = lambda: True
    cuda.current_stream = lambda *a, **k: Stream()
    cuda.Stream = lambda *a, **k: Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=0, name="cpu", major=9, minor=0)
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda *a, **k: None


if __name__ == "__main__":
    checkout = sys.argv[1]
    sys.path.insert(0, checkout)
    install()
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    original_seed = mp_random.model_parallel_cuda_manual_seed

    def cpu_seed(seed, te_rng_tracker=False, inference_rng_tracker=False, *a, **k):
        return original_seed(seed, te_rng_tracker, True, *a, **k)  # the tracker that needs no CUDA RNG

    tensor_parallel.model_parallel_cuda_manual_seed = mp_random.model_parallel_cuda_manual_seed = cpu_seed
    try:  # Megatron-LM up to core_v0.16 builds fused CUDA kernels at start-up; nothing to build on a CPU
        import megatron.legacy.fused_kernels as fused_kernels

        fused_kernels.load = lambda args: None
    except ModuleNotFoundError:  # later versions have no megatron.legacy
        pass
    from sara_ds.integrations.megatron_launch import main

    main(sys.argv[2:])
