"""TP spectra from hand-sharded slices against a float64 SVD, and bytes counted in real collectives."""
import os
import tempfile

import pytest
import torch

from launch_utils import ROOT, run_ranks
from sara_ds.sharding.tensor_parallel import refresh_bytes
from tp_math_worker import M, N, RANK, known_matrix


@pytest.fixture(scope="module", params=[2, 4])
def shards(request):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        for code, log in run_ranks(os.path.join(ROOT, "tests", "tp_math_worker.py"), request.param, [out], timeout=120):
            assert code == 0, log[-3000:]
        return request.param, torch.load(out)


def _residual_ratio(full, basis, sigma, r):
    """||G - proj_B(G)||_F / ||G - G_r||_F: 1.0 is the best any rank-r basis can do."""
    best = sigma[r:].square().sum().sqrt()
    return ((full - full @ basis @ basis.T).norm() / best).item()


def test_exact_modes_match_the_svd_of_the_gathered_matrix(shards):
    world, per_rank = shards
    full, sigma = known_matrix()
    print(f"\nTP={world}, {M}x{N} matrix, sigma 10 ... {sigma[-1]:.1e}, rank {RANK}")
    for pd in (0, 1):
        # pd=0 shards the rows of `full`, pd=1 the columns of full^T: either way the basis spans
        # N-dimensional space (the unsharded axis), and it is judged against `full` projected on the right.
        for method in ("tsqr", "gram"):
            res = per_rank[0][f"{method}-pd{pd}"]
            rel = ((res["sigma"][:N] - sigma) / sigma).abs()
            ratio = _residual_ratio(full, res["basis"], sigma, RANK)
            print(f"  {method} pd={pd}: max rel err of sigma: top-8 {rel[:8].max():.1e}, all {rel.max():.1e}; "
                  f"residual / optimal {ratio:.6f}")
            assert ratio < 1 + 1e-5
            assert rel[:8].max() < 1e-5
            if method == "tsqr":
                assert rel.max() < 1e-3  # backward-stable: even the smallest sigma (3.5e-4) is accurate
            for other in per_rank[1:]:  # bit-identical basis on every TP rank
                assert torch.equal(other[f"{method}-pd{pd}"]["basis"], res["basis"])


def test_uneven_row_blocks_give_the_same_spectrum(shards):
    """ZeRO-3's row blocks split A's columns unevenly over the DP group: tsqr (R factors padded to one height),
    gram and 'gather' (the matrix on one rank, its SVD there) match the SVD; the sketch, its test matrix cut at
    each rank's own offset, matches the evenly split sketch; every rank takes the root's basis, bit for bit."""
    world, per_rank = shards
    full, sigma = known_matrix()
    counts = per_rank[0]["uneven-tsqr"]["counts"]
    assert len(set(counts)) == 2 and sum(counts) == M
    for method in ("tsqr", "gram", "gather"):
        root = per_rank[-1][f"uneven-{method}"]
        rel = ((root["sigma"][:N] - sigma) / sigma).abs()
        ratio = _residual_ratio(full, root["basis"], sigma, RANK)
        print(f"  uneven {method}: top-8 rel err of sigma {rel[:8].max():.1e}; residual / optimal {ratio:.6f}")
        assert ratio < 1 + 1e-5 and rel[:8].max() < 1e-5, method
        assert root["full_shape"] == (M, N)
        for other in per_rank[:-1]:
            assert torch.equal(other[f"uneven-{method}"]["basis"], root["basis"]), method
    sketch, even = per_rank[0]["uneven-sketch"], per_rank[0]["sketch-pd0"]
    assert (sketch["sigma"][:RANK] - even["sigma"][:RANK]).abs().max() < 1e-5 * sigma[0]
    assert (sketch["basis"].abs() - even["basis"].abs()).abs().max() < 1e-4
    # 'gather': each other rank sends its rows padded to the largest block; the root broadcasts the basis
    assert [r["uneven-gather"]["bytes"] for r in per_rank] == [4 * max(counts) * N] * (world - 1) + [4 * N * RANK]
    assert all(r["uneven-gather"]["sigma"] is None for r in per_rank[:-1])


def test_gram_loses_the_small_singular_values_that_tsqr_keeps(shards):
    _, per_rank = shards
    _, sigma = known_matrix()
    tsqr = ((per_rank[0]["tsqr-pd0"]["sigma"][:N] - sigma) / sigma).abs()[-8:].max()
    gram = ((per_rank[0]["gram-pd0"]["sigma"][:N] - sigma) / sigma).abs()[-8:].max()
    print(f"\nrelative error of the 8 smallest sigma: tsqr {tsqr:.1e}, gram {gram:.1e}")
    assert gram > 10 * tsqr


def test_sketch_accuracy_figure(shards):
    world, per_rank = shards
    full, sigma = known_matrix()
    ratios = [_residual_ratio(full, per_rank[0][f"sketch-pd{pd}"]["basis"], sigma, RANK) for pd in (0, 1)]
    print(f"\nsketch (k = r + 8, 2 power iterations), TP={world}: residual / optimal rank-{RANK} residual = "
          + ", ".join(f"{r:.4f}" for r in ratios))
    assert all(r < 1.05 for r in ratios)


# What each spectrum puts on the wire, per TP rank, written out here from the algorithms (fp32; k = r + 8
# sketch columns, 2 power iterations), then TP rank 0 broadcasts the chosen N x r basis.
WIRE = {
    "tsqr": lambda rows: [("all_gather", 4 * min(rows, N) * N)],
    "gram": lambda rows: [("all_reduce", 4 * N * N)],
    "sketch": lambda rows: [("all_reduce", 4 * N * (RANK + 8))] * 3 + [("all_reduce", 4 * (RANK + 8) ** 2)],
}


def test_bytes_on_the_wire_equal_the_analytic_figures(shards):
    """Counted by a wrapper around torch.distributed's collectives (tests/counting_dist.py), not by the library."""
    world, per_rank = shards
    for rank, results in enumerate(per_rank):
        for key, res in results.items():
            if key.startswith("uneven-"):  # test_uneven_row_blocks_give_the_same_spectrum
                continue
            method, pd = key.split("-pd")
            expected = WIRE[method](res["local_rows"]) + [("broadcast", 4 * N * RANK if rank == 0 else 0)]
            assert [(op, b) for op, size, b in res["wire"]] == expected, (rank, key, res["wire"])
            assert all(size == world for _, size, _ in res["wire"])
            wire = sum(b for _, b in expected)
            # the library's own counter and its published formula (benchmarks/tp_comm.py) agree with the wire
            assert res["bytes"] == wire == refresh_bytes(method, res["local_rows"], N, RANK, root=(rank == 0))


def test_an_uneven_autotp_split_is_refused_with_its_shapes():
    """AutoTP may split by attention-head grain into unequal shards, which the TP spectra cannot take."""
    from sara_ds.sharding.tensor_parallel import AUTOTP_META, refuse_uneven_split

    weight = torch.nn.Parameter(torch.zeros(3, 8))
    weight.tensor_model_parallel = True
    setattr(weight, AUTOTP_META, {"partition_dim": 0, "original_shape": [8, 8]})
    with pytest.raises(ValueError, match=r"local shape \(3, 8\) is an uneven shard of \(8, 8\) "
                                         r"\(split along dim 0 over 3 ranks\)"):
        refuse_uneven_split(weight, 3)
    setattr(weight, AUTOTP_META, {"partition_dim": 0, "original_shape": [9, 8]})
    refuse_uneven_split(weight, 3)  # an even split is accepted
    setattr(weight, AUTOTP_META, {"partition_dim": 1, "original_shape": [3, 20]})
    with pytest.raises(ValueError, match=r"split along dim 1 over 3 ranks"):
        refuse_uneven_split(weight, 3)
