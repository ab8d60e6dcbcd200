"""Tensor parallelism on megatron-core's ColumnParallelLinear / RowParallelLinear: TP=1, 2, 4 give the
weights of one dense process, every TP rank holds the same basis, and only small factors are sent."""
import pytest
import torch

pytest.importorskip("megatron.core")

import sara_ds  # noqa: E402
from launch_utils import run_scenarios  # noqa: E402
from tp_worker import HIDDEN, dense_reference  # noqa: E402


# OSD takes an Adam step on its basis every step, and right after the SVD start that basis gradient is
# round-off, which Adam normalises into full-size steps: a 1e-7 relative change of the gradients moves its
# weights by ~5e-4 (tests/test_deepspeed.py::test_round_off_sensitivity_of_each_rule). TP sums the same
# gradient in another order, so OSD gets that bound; every other rule must match to 1e-6.
LIMITS = {"osd": 2e-3}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in ("w1", "w2"))


FIRA = {"fira", "sara_fira", "grassjump", "grasswalk"}


def ordinary_step_wire(sc, tp, r=4):
    """What one TP rank puts on the wire in an ordinary (non-refresh) step, from the algorithms: one 4-byte flag
    for the whole step, then per matrix.

    Both matrices of the default model have their basis on the unsplit side n = HIDDEN: Adafactor's row-mean
    factor (the column count, the r row sums, the update's RMS), Fira's residual norm, and OSD's basis gradient
    (its input norm, then the n x r gradient) cross the group; AdamW and Adam-mini send nothing.

    With square matrices (``ffn`` = HIDDEN) one process puts both bases on the right, which for the row-parallel
    one is its split axis: its R (r x HIDDEN) is summed over the group every step, after which its statistics are
    whole; Fira still sums its residual's norm, and OSD sums its input norm and B^T A and gathers the rows of its
    basis gradient."""
    if tp == 1:
        return []
    whole_axis = []
    if sc.get("optimizer") == "SaraAdafactor":
        whole_axis += [("all_reduce", 4), ("all_reduce", 4 * r), ("all_reduce", 4)]
    if sc["preset"] in FIRA:
        whole_axis += [("all_reduce", 4)]
    if sc["preset"] == "osd":
        whole_axis += [("all_reduce", 4), ("all_reduce", 4 * HIDDEN * r)]
    if sc.get("ffn") != HIDDEN or sc.get("tp_side") == "unsplit":
        return [("all_reduce", 4)] + whole_axis * 2
    split_axis = [("all_reduce", 4 * r * HIDDEN)] + ([("all_reduce", 4)] if sc["preset"] in FIRA else [])
    if sc["preset"] == "osd":
        split_axis += [("all_reduce", 4), ("all_reduce", 4 * r * HIDDEN), ("all_gather", 4 * HIDDEN // tp * r)]
    return [("all_reduce", 4)] + whole_axis + split_axis


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_equals_one_dense_process_for_every_rule(tp):
    scenarios = [dict(preset=p, mode=m) for p in sorted(sara_ds.PRESETS) for m in ("tsqr", "gram")]
    # the sketch inside the optimizer: these gradients have rank <= 6 < k = r + 8, so the range finder
    # captures their whole range and must give the exact spectrum (its accuracy on a full-rank matrix with
    # a 3e4 condition number is in test_tp_math.py)
    scenarios += [dict(preset=p, mode="sketch") for p in ("galore", "sara", "sara_fira")]
    scenarios += [dict(preset=p, optimizer=o) for o in ("SaraAdafactor", "SaraAdamMini") for p in ("sara", "sara_fira")]
    # a NaN on one TP rank's shard only: every rank skips the whole step
    scenarios += [dict(preset="sara", nan_step=3), dict(preset="sara_fira", optimizer="SaraAdafactor", nan_step=2)]
    # square matrices (as LLaMA's attention projections): one process's side is the row-parallel one's split axis
    scenarios += [dict(preset=p, ffn=HIDDEN) for p in sorted(sara_ds.PRESETS)]
    scenarios += [dict(preset="sara", ffn=HIDDEN, optimizer=o) for o in ("SaraAdafactor", "SaraAdamMini")]
    results = run_scenarios(tp, scenarios, worker="tp_worker.py")
    print(f"\nTP={tp} (megatron-core parallel layers, gloo), 7 steps, refreshes at 0, 2, 4, 6:")
    for sc, res in zip(scenarios, results):
        diff = _max_diff(res, dense_reference(sc))
        name = f"{sc.get('optimizer', 'SaraAdamW')}/{sc['preset']}/{sc.get('mode', 'tsqr')}" + (
            "/square" if sc.get("ffn") == HIDDEN else "")
        print(f"  {name:<32} max|TP - dense| = {diff:.2e}")
        assert diff < LIMITS.get(sc["preset"], 1e-6), name
        if tp == 1:  # a TP group of one is the dense process, bit for bit
            assert diff == 0.0, name
        first = res["per_rank"][0]["bases"]
        for other in [r["bases"] for r in res["per_rank"][1:]]:  # every TP rank holds a bit-identical basis
            assert all(torch.equal(first[i], other[i]) for i in first)
        taken = 7 - ("nan_step" in sc)  # steps taken; refreshes at taken-step 0, 2, 4, 6
        assert res["counts"]["refreshes"] == 2 * (1 if sc["preset"] == "osd" else (taken + 1) // 2), name
        assert res["counts"]["skipped_steps"] == ("nan_step" in sc), name
        # collectives of ordinary steps, counted by a wrapper around torch.distributed (not the library's counter)
        refresh_steps = {0} if sc["preset"] == "osd" else {0, 2, 4, 6}
        for step, wire in enumerate(res["step_wire"]):
            if step == sc.get("nan_step"):  # the 2-norm flag, then the exact max-|g| flag that confirms it
                assert wire == ([("all_reduce", 4)] * 2 if tp > 1 else []), (name, step, wire)
            elif step not in refresh_steps and "nan_step" not in sc:
                assert wire == ordinary_step_wire(sc, tp), (name, step, wire)


def test_the_communication_free_side_is_an_opt_in_that_changes_square_matrices():
    """tp_side='unsplit' puts every basis on the whole axis: no per-step collective besides the flag and the
    statistics, and the same algorithm as one process where the two sides agree (the default model), but
    another one for a square row-parallel matrix, whose one-process basis is on its split axis."""
    scenarios = [dict(preset="sara", tp_side="unsplit"), dict(preset="sara", tp_side="unsplit", ffn=HIDDEN),
                 dict(preset="sara", ffn=HIDDEN)]
    unsplit, unsplit_square, same_square = run_scenarios(2, scenarios, worker="tp_worker.py")
    agree = _max_diff(unsplit, dense_reference(scenarios[0]))
    differs = _max_diff(unsplit_square, dense_reference(scenarios[1]))
    same = _max_diff(same_square, dense_reference(scenarios[2]))
    print(f"\nTP=2, max|TP - dense|: unsplit side, sides agree {agree:.1e}; square, unsplit {differs:.1e}, "
          f"same side {same:.1e}")
    assert agree < 1e-6 and same < 1e-6
    assert differs > 1e-3  # a different subspace for the row-parallel matrix: not round-off
    for step in (1, 3, 5):
        assert unsplit_square["step_wire"][step] == ordinary_step_wire(scenarios[1], 2)
        assert same_square["step_wire"][step] == ordinary_step_wire(scenarios[2], 2)


def test_tp_banks_equal_the_per_matrix_path_and_reduce_once_per_bank():
    """Two blocks give two column-parallel and two row-parallel shards of one shape each: two banks. With
    foreach=True each bank's Fira norms (and Adafactor's row sums) cross the TP group in one all-reduce."""
    scenarios = [dict(preset=p, optimizer=o, blocks=2, foreach=f) for o, p in
                 (("SaraAdamW", "sara_fira"), ("SaraAdafactor", "sara"), ("SaraAdamMini", "sara")) for f in (True, False)]
    results = run_scenarios(2, scenarios, worker="tp_worker.py")
    keys = ("w1", "w2", "w3", "w4")
    print("\nTP=2, two blocks, banks (foreach=True) against per matrix (foreach=False):")
    for (banked, single), sc in zip(zip(results[::2], results[1::2]), scenarios[::2]):
        name = f"{sc['optimizer']}/{sc['preset']}"
        dense = dense_reference(sc)
        diff = max((banked[k] - dense[k]).abs().max().item() for k in keys)
        print(f"  {name:<24} max|banks - dense| = {diff:.2e}; banks {banked['banks']}")
        assert banked["banks"] == 2 and single["banks"] == 0, name
        assert all(torch.equal(banked[k], single[k]) for k in keys), name  # TP=2 sums are exact in any grouping
        assert diff < 2e-6, name  # the two-block model's TP-vs-dense round-off (measured up to 9.2e-7)
        for step in (1, 3, 5):  # ordinary steps: as many collectives per bank as a lone matrix makes
            per_matrix = len(single["step_wire"][step]) - 1  # less the step's finite flag
            assert len(banked["step_wire"][step]) - 1 == per_matrix // 2, (name, banked["step_wire"][step])
            # the same statistics cross the group, but Adafactor's 4-byte column count once per bank
            saved = 4 * 2 if sc["optimizer"] == "SaraAdafactor" else 0
            assert sum(b for _, b in banked["step_wire"][step]) == sum(b for _, b in single["step_wire"][step]) - saved


def test_tp_device_flag_reads_nothing_back_and_sends_one_flag():
    """finite_flag='device' at TP=2, banked and per matrix: the same weights as the host flag, ordinary steps read
    nothing back to the host and put the same collectives on the wire (one 4-byte flag, then what the base must
    reduce). A NaN on one rank's shard at an ordinary step (3) is skipped by every rank, as one dense process
    with the device flag skips it."""
    cases = [("SaraAdamW", "sara_fira"), ("SaraAdafactor", "sara"), ("SaraAdamMini", "sara")]
    scenarios = [dict(preset=p, optimizer=o, blocks=2, foreach=f, finite_flag=flag) for o, p in cases
                 for f in (True, False) for flag in ("device", "host")]
    scenarios += [dict(preset=p, optimizer=o, blocks=2, foreach=True, finite_flag="device", nan_step=3)
                  for o, p in cases]
    results = run_scenarios(2, scenarios, worker="tp_worker.py")
    keys = ("w1", "w2", "w3", "w4")
    refresh_steps = {0, 2, 4, 6}
    by_name = {}
    for sc, res in zip(scenarios, results):
        by_name[(sc["optimizer"], sc["foreach"], sc["finite_flag"], sc.get("nan_step"))] = res
    print("\nTP=2, two blocks, device flag:")
    for o, p in cases:
        for foreach in (True, False):
            device, host = by_name[(o, foreach, "device", None)], by_name[(o, foreach, "host", None)]
            assert all(torch.equal(device[k], host[k]) for k in keys), (o, foreach)
            for step in range(7):
                if step not in refresh_steps:
                    assert device["step_reads"][step] == 0 and host["step_reads"][step] == 1, (o, foreach, step)
                    assert device["step_wire"][step] == host["step_wire"][step], (o, foreach, step)
                    assert device["step_wire"][step][0] == ("all_reduce", 4)
        skipped = by_name[(o, True, "device", 3)]
        sc = dict(preset=p, optimizer=o, blocks=2, foreach=True, finite_flag="device", nan_step=3)
        diff = max((skipped[k] - dense_reference(sc)[k]).abs().max().item() for k in keys)
        print(f"  {o}/{p}: NaN at step 3 skipped on the device, max|TP - dense| = {diff:.2e}, "
              f"host reads per step {skipped['step_reads']}")
        assert skipped["counts"]["skipped_steps"] == 1 and skipped["step_reads"][3] == 0, o
        assert diff < 2e-6, o
