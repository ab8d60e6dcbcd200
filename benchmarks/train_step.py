"""Peak memory and tokens/s of whole training steps: torch AdamW, galore-torch and sara_ds, side by side in one run.

Each row is one process (so one row's allocations never count in another's peak): the harness's LLaMA at a
GaLore-protocol size, random tokens, forward + backward + optimizer step, in one of two engines:

  * ``plain``: the model in bf16 (``--dtype``), the optimizer on its parameters, as galore-torch's own
    training script runs (torch AdamW fused, galore-torch GaLoreAdamW, sara_ds SaraAdamW preset sara);
  * ``zero2``: DeepSpeed ZeRO-2 with bf16 and fp32 master weights (torch AdamW fused as a client optimizer,
    SaraAdamW registered through the config's ``"optimizer": {"type": "SaraAdamW"}``). galore-torch is not
    run there: ZeRO-2 hands the optimizer flat 1-D partitions, on which it projects nothing.

The projected matrices are the papers' (q, k, v, o, gate, up, down) at the GaLore ranks, scale 0.25. Step 0
refreshes the subspaces (with CUDA's warm-up, untimed); after ``--warmup`` untimed steps come ``--steps``
timed ordinary steps (their median is "step") and then a second, timed refresh ("refresh"): the projected
optimizers run with update_proj_gap = 1 + warmup + steps so that it falls there. "amortised" adds that refresh
once per ``--gap`` steps (T, 200 by default), as a run with that T pays it; AdamW has none. Peak memory is ``torch.cuda.max_memory_allocated``
over the whole row; "later" is the peak after the warm-up (the timed steps and the second refresh); "state" is what the first step leaves allocated beyond the built model (the optimizer's state,
and under ZeRO-2 its gradient partitions as well).

    python benchmarks/train_step.py --device cuda --sizes 350m,1b            # on a GPU
    python benchmarks/train_step.py --device cpu --sizes tiny --steps 2 --warmup 1 --dtype fp32   # a smoke run
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch

RANKS = {"tiny": 16, "60m": 128, "130m": 256, "350m": 256, "1b": 512}
ROWS = (("plain", "torch AdamW fused"), ("plain", "galore-torch GaLoreAdamW"), ("plain", "sara_ds SaraAdamW"),
        ("zero2", "torch AdamW fused"), ("zero2", "sara_ds SaraAdamW"))
LR = 1e-3


def galore_adamw():
    """galore-torch's GaLoreAdamW, or (None, why). Its package's ``__init__`` also imports bitsandbytes (for the
    8-bit variant alone): without it, the AdamW module is imported from the installed package directly."""
    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW, None
    except ImportError as error:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            return None, f"galore-torch is not installed ({error})"
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
        from galore_torch.adamw import AdamW
        return AdamW, None


def model_config(size):
    from sara_bench import llama
    if size == "tiny":
        return llama.LlamaConfig(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=llama.swiglu_width(64))
    return llama.PAPER_SIZES[size]


def sara_options(size, args):
    return dict(rank=RANKS[size], update_proj_gap=1 + args.warmup + args.steps, scale=0.25)


def build(engine, optimizer, size, args, device):
    """(a step function taking (tokens, targets), the module holding the parameters, the optimizer stepping them)."""
    import sara_ds
    from sara_bench import llama
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = llama.Llama(dataclasses.replace(model_config(size), max_seq=args.seq_len))
    if engine == "plain":
        model.to(dtype)
        if optimizer == "torch AdamW fused":
            opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
        else:
            groups = sara_ds.param_groups(model, **sara_options(size, args))
            if optimizer == "sara_ds SaraAdamW":
                opt = sara_ds.SaraAdamW(groups, lr=LR, preset="sara")
            else:
                GaLoreAdamW, why = galore_adamw()
                if GaLoreAdamW is None:
                    raise SystemExit(why)
                opt = GaLoreAdamW(groups, lr=LR, no_deprecation_warning=True)

        def step(tokens, targets):
            model(tokens, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, model, opt

    import deepspeed
    config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": args.dtype == "bf16"}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "reduce_scatter": True, "overlap_comm": False,
                                    "contiguous_gradients": True},
              "steps_per_print": 10 ** 9}
    client = None
    if optimizer == "torch AdamW fused":
        client = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
    else:
        config["optimizer"] = {"type": "SaraAdamW", "params": dict(lr=LR, preset="sara", seed=0,
                                                                    **sara_options(size, args))}
    engine_, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=client,
                                       config=config)

    def step(tokens, targets):
        engine_.backward(engine_(tokens, targets))
        engine_.step()
    return step, engine_.module, getattr(engine_.optimizer, "optimizer", engine_.optimizer)  # ZeRO's wrapped one


def one_row(engine, optimizer, size, args):
    """Run one row in this process; print it as one JSON line."""
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    if engine == "zero2":
        import deepspeed
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, model, opt = build(engine, optimizer, size, args, device)
    vocab = model_config(size).vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g, device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times, before_timed = [], 0
    built = torch.cuda.memory_allocated() if cuda else 0
    for i in range(2 + args.warmup + args.steps):
        if i == 1 + args.warmup and cuda:
            before_timed = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()  # "later": after the warm-up
        sync()
        t0 = time.perf_counter()
        step(inputs, targets)
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0 and cuda:
            state = torch.cuda.memory_allocated() - built  # what the first step left allocated: the optimizer's state
    steady = statistics.median(times[1 + args.warmup:-1])
    refresh = times[-1] if optimizer != "torch AdamW fused" else None  # for AdamW, one more ordinary step
    amortised = steady if refresh is None else ((args.gap - 1) * steady + refresh) / args.gap
    tokens_per_step = args.batch * args.seq_len
    row = dict(engine=engine, optimizer=optimizer, stepped_by=type(opt).__name__, size=size, params=sum(p.numel() for p in model.parameters()),
               step_s=steady, refresh_s=refresh, tokens_per_s=tokens_per_step / steady,
               amortised_tokens_per_s=tokens_per_step / amortised)
    if cuda:
        steady_peak = torch.cuda.max_memory_allocated()
        row.update(state_gib=state / 2 ** 30, peak_gib=max(before_timed, steady_peak) / 2 ** 30, later_peak_gib=steady_peak / 2 ** 30)
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="350m,1b", help="of tiny,60m,130m,350m,1b")
    ap.add_argument("--rows", default=None, help="'engine:optimizer' pairs to run, ';'-separated (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed ordinary steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed ordinary steps after the first refresh")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap T, for the amortised figure")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--row_timeout", type=float, default=300, help="seconds one row may take")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # engine:optimizer:size, run in this process
    args = ap.parse_args()
    if args.one:
        one_row(*args.one.split(":"), args)
        return
    wanted = [tuple(r.split(":")) for r in args.rows.split(";")] if args.rows else ROWS
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}; {args.dtype}; batch {args.batch}x{args.seq_len} tokens; T={args.gap}; "
          f"step = median of {args.steps} ordinary steps after {args.warmup} warm-up steps; one process per row", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for size in args.sizes.split(","):
        print(f"\n== LLaMA-{size} (rank {RANKS[size]} on the projected matrices)", flush=True)
        print(f"   {'engine':<7}{'optimizer':<26}{'params':>8}{'state GiB':>10}{'peak GiB':>9}{'later':>8}{'step ms':>9}{'refresh s':>10}"
              f"{'tok/s':>9}{'amortised':>10}{'mem/AdamW':>10}{'tok/s /AdamW':>13}", flush=True)
        adamw = {}
        for engine, optimizer in wanted:
            command = [sys.executable, __file__, "--one", f"{engine}:{optimizer}:{size}"] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("one", "rows", "sizes") and v is not None]
            started = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.row_timeout)
                out = done.stdout + done.stderr
            except subprocess.TimeoutExpired as error:
                out = f"{(error.stdout or b'').decode(errors='replace')}\ntime limit {args.row_timeout:.0f}s"
            rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            if not rows:
                tail = " | ".join(out.strip().splitlines()[-3:])
                print(f"   {engine:<7}{optimizer:<26} failed after {time.perf_counter() - started:.0f}s: {tail}", flush=True)
                continue
            r = rows[0]
            peak = r.get("peak_gib")
            if optimizer.startswith("torch AdamW"):
                adamw[engine] = r
            base = adamw.get(engine)
            mem_ratio = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and peak else "-"
            speed_ratio = f"{r['amortised_tokens_per_s'] / base['amortised_tokens_per_s']:.2f}" if base else "-"
            later = f"{r['later_peak_gib']:.2f}" if peak else "-"
            refresh = "-" if r["refresh_s"] is None else f"{r['refresh_s']:.2f}"
            state = f"{r['state_gib']:.2f}" if peak else "-"
            print(f"   {engine:<7}{optimizer:<26}{r['params'] / 1e6:>7.0f}M{state:>10}"
                  f"{(f'{peak:.2f}' if peak else '-'):>9}{later:>8}"
                  f"{r['step_s'] * 1e3:>9.1f}{refresh:>10}{r['tokens_per_s']:>9.0f}"
                  f"{r['amortised_tokens_per_s']:>10.0f}{mem_ratio:>10}{speed_ratio:>13}", flush=True)


if __name__ == "__main__":
    main()
