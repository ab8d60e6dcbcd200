"""Which dtype the example job trains in: bf16 only where the device computes it natively.

The shipped DeepSpeed configs say ``"bf16": {"enabled": "auto"}``. The rule, in order:

1. an explicit ``--dtype bf16|fp32`` wins;
2. else an explicit ``true``/``false`` in the config's ``bf16.enabled`` wins (an enabled ``fp16`` is left alone);
3. else (``"auto"``, or no ``bf16`` block) bf16 where the device has native bf16, fp32 otherwise.

Native bf16 means: on CUDA, ``torch.cuda.is_bf16_supported()``; on a CPU, AMX-BF16 or AVX512-BF16
(as torch's cpuinfo reports them, else the ``/proc/cpuinfo`` flags). Without them torch emulates a bf16
matmul; on an AVX2-only AMD EPYC a 512x512 one on one thread measured 50x slower than in fp32.

DeepSpeed itself must never see ``"auto"``. Older releases read ``bf16.enabled`` with a plain truth test
(``get_scalar_param``), so the string switches bf16 on; 0.19.8 (installed here) drops an ``"auto"`` value to
the field's default, false, so bf16 would never follow the device. ``resolve_config`` returns a config with
a real bool there.
"""
from __future__ import annotations

import copy

DTYPES = ("auto", "bf16", "fp32")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_isa() -> str:
    """torch's dispatch level for this CPU: 'AVX2', 'AVX512', 'DEFAULT', ... ('unknown' if not reported)."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old or exotic build: only the message loses detail
        return "unknown"


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_features() -> list[str]:
    """The native-bf16 features this CPU has, from those in ``CPU_BF16_FLAGS`` (empty: bf16 is emulated).

    torch's own cpuinfo first (``torch.cpu.get_capabilities()``, torch >= 2.10; ``torch.cpu._is_*_supported``
    on older builds), else the kernel's ``/proc/cpuinfo`` flags.
    """
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
            return [name for name in CPU_BF16_FLAGS if caps.get(name)]
        except Exception:  # noqa: BLE001 - fall through to the older probes
            pass
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}  # AMX tiles ship with AMX-BF16
    found, probed = [], False
    for name, fn in probes.items():
        for owner in (torch.cpu, getattr(getattr(torch, "_C", None), "_cpu", None)):
            probe = getattr(owner, fn, None)
            if probe is not None:
                probed = True
                if probe():
                    found.append(name)
                break
    if probed:
        return found
    flags = cpuinfo_flags()
    return [name for name in CPU_BF16_FLAGS if name in flags]


def native_bf16(device_type: str) -> tuple[bool, str]:
    """(whether ``device_type`` computes bf16 natively, a few words on what was found)."""
    import torch

    if device_type == "cpu":
        found = cpu_bf16_features()
        if found:
            return True, f"this CPU has native bf16 ({', '.join(f.upper().replace('_', '-') for f in found)})"
        return False, f"this CPU has no native bf16 ({cpu_isa()}, no AMX-BF16 or AVX512-BF16)"
    if device_type == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"this GPU ({name}) {'has' if ok else 'has no'} native bf16"
    module = getattr(torch, device_type, None)
    probe = getattr(module, "is_bf16_supported", None)
    ok = bool(probe()) if probe is not None else False
    return ok, f"{device_type} {'reports' if ok else 'does not report'} bf16 support"


def _config_bf16(ds_config: dict):
    """The config's bf16.enabled as True, False or 'auto' (no bf16 block: 'auto')."""
    block = ds_config.get("bf16", ds_config.get("bfloat16"))
    if block is None:
        return "auto"
    value = block.get("enabled", False)
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"sara_bench: bf16.enabled must be true, false or \"auto\" in the DeepSpeed config, got {value!r}")


def resolve_dtype(requested: str, config_bf16, device_type: str, native=native_bf16) -> tuple[str, str]:
    """('bf16' or 'fp32', why) by the rule in the module docstring; ``native`` is ``native_bf16`` (tests patch it)."""
    if requested not in DTYPES:
        raise ValueError(f"sara_bench: --dtype must be one of {DTYPES}, got {requested!r}")
    if requested != "auto":
        return requested, f"--dtype {requested}"
    if config_bf16 is True or config_bf16 is False:
        return ("bf16" if config_bf16 else "fp32"), f"the config sets bf16.enabled={str(config_bf16).lower()}"
    ok, found = native(device_type)
    if ok:
        return "bf16", f"{found}. Pass --dtype fp32 to train in fp32."
    slow = " bf16 would be emulated, ~50x slower." if device_type == "cpu" else ""
    return "fp32", f"{found};{slow} Pass --dtype bf16 to force it."


def resolve_config(ds_config: dict, requested: str = "auto", device_type: str = "cpu",
                   native=native_bf16) -> tuple[dict, str, str]:
    """(a copy of ``ds_config`` with a real bool in bf16.enabled, the dtype, a one-line message for rank 0).

    A config that enables fp16 keeps it unless ``--dtype`` asks for something else.
    """
    cfg = copy.deepcopy(ds_config)
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    if requested == "auto" and fp16 is True:
        cfg.setdefault("bf16", {})["enabled"] = False
        cfg.pop("bfloat16", None)
        return cfg, "fp16", "[sara_ds] dtype fp16: the config sets fp16.enabled=true"
    dtype, why = resolve_dtype(requested, _config_bf16(cfg), device_type, native)
    block = cfg.pop("bfloat16", None) or cfg.get("bf16") or {}
    cfg["bf16"] = dict(block, enabled=dtype == "bf16")
    if "fp16" in cfg:
        cfg["fp16"] = dict(cfg["fp16"], enabled=False)
    return cfg, dtype, f"[sara_ds] dtype {dtype}: {why}"
