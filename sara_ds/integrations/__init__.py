"""Engine adapters: DeepSpeed (config registration, ZeRO) and Megatron (optimizer builder, launcher)."""
