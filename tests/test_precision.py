"""The example job's dtype rule (sara_bench.precision): --dtype, then the config, then native bf16 support."""
import glob
import json
import os

import pytest

from sara_bench import precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def native(flag):
    return lambda device: (flag, f"patched: native={flag}")


@pytest.mark.parametrize("has_native", [True, False])
def test_precedence_dtype_flag_then_config_then_device(has_native):
    resolve = lambda requested, cfg: precision.resolve_dtype(requested, cfg, "cpu", native=native(has_native))[0]  # noqa: E731
    # 1. an explicit --dtype wins over the config and the device
    for cfg in (True, False, "auto"):
        assert resolve("bf16", cfg) == "bf16" and resolve("fp32", cfg) == "fp32"
    # 2. else an explicit true/false in the config wins over the device
    assert resolve("auto", True) == "bf16" and resolve("auto", False) == "fp32"
    # 3. else ("auto") what the device supports natively
    assert resolve("auto", "auto") == ("bf16" if has_native else "fp32")


def test_auto_on_a_cpu_without_native_bf16_says_why_and_how_to_force_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    monkeypatch.setattr(precision, "cpu_isa", lambda: "AVX2")
    cfg, dtype, msg = precision.resolve_config({"bf16": {"enabled": "auto"}}, "auto", "cpu")
    assert dtype == "fp32" and cfg["bf16"]["enabled"] is False
    assert msg == ("[sara_ds] dtype fp32: this CPU has no native bf16 (AVX2, no AMX-BF16 or AVX512-BF16); "
                   "bf16 would be emulated, ~50x slower. Pass --dtype bf16 to force it.")
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["amx_bf16"])
    cfg, dtype, msg = precision.resolve_config({"bf16": {"enabled": "auto"}}, "auto", "cpu")
    assert dtype == "bf16" and cfg["bf16"]["enabled"] is True and "AMX-BF16" in msg


def test_cpu_features_from_torch_else_proc_cpuinfo(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True, "amx_bf16": False})
    assert precision.cpu_bf16_features() == ["avx512_bf16"]
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    assert precision.cpu_bf16_features() == []
    # a torch without the capability probes: the kernel's flags decide
    for name in ("get_capabilities", "_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
        monkeypatch.delattr(torch._C._cpu, name, raising=False)
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert precision.cpu_bf16_features() == ["amx_bf16"]
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "fma"})
    assert precision.cpu_bf16_features() == []


def test_this_machine_is_probed_without_error():
    ok, why = precision.native_bf16("cpu")
    assert isinstance(ok, bool) and why.startswith("this CPU has")
    print(f"\n{why}")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "ds", "*.json"))),
                         ids=os.path.basename)
def test_no_shipped_config_reaches_deepspeed_with_auto(path):
    raw = json.load(open(path))
    assert raw["bf16"]["enabled"] == "auto"  # the shipped configs leave it to the device
    for has_native, dtype in ((True, "bf16"), (False, "fp32")):
        cfg, got, _ = precision.resolve_config(raw, "auto", "cpu", native=native(has_native))
        assert got == dtype and cfg["bf16"]["enabled"] is (dtype == "bf16")  # a real bool, never "auto", for DeepSpeed
        assert "auto" not in json.dumps(cfg["bf16"]) and raw["bf16"]["enabled"] == "auto"  # the input is not modified


def test_fp16_configs_and_bad_values():
    cfg, dtype, _ = precision.resolve_config({"fp16": {"enabled": True}}, "auto", "cpu", native=native(True))
    assert dtype == "fp16" and cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    cfg, dtype, _ = precision.resolve_config({"fp16": {"enabled": True}}, "fp32", "cpu", native=native(True))
    assert dtype == "fp32" and cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is False
    cfg, dtype, _ = precision.resolve_config({}, "auto", "cpu", native=native(False))  # no bf16 block: auto
    assert dtype == "fp32" and cfg["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="bf16.enabled must be"):
        precision.resolve_config({"bf16": {"enabled": "yes"}}, "auto", "cpu")
    with pytest.raises(ValueError, match="--dtype must be"):
        precision.resolve_dtype("fp16", "auto", "cpu")
