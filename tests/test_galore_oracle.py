"""Peer oracle: with the dominant rule and the AdamW base, SaraAdamW is galore-torch's GaLoreAdamW."""
import copy
import warnings

import pytest
import torch

import sara_ds
from conftest import galore_groups, train

galore_torch = pytest.importorskip("galore_torch")


TOLERANCE = 1e-6  # the README quotes this figure


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_dominant_adamw_matches_galore_torch_step_for_step(shapes_net, weight_decay, proj_type):
    ours_model, peer_model = shapes_net, copy.deepcopy(shapes_net)
    # galore-torch keeps LAPACK's singular-vector signs; so does basis_signs="lapack"
    ours = sara_ds.SaraAdamW(galore_groups(ours_model, proj_type=proj_type), lr=1e-2, weight_decay=weight_decay,
                             preset="galore", basis_signs="lapack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = galore_torch.GaLoreAdamW(galore_groups(peer_model, proj_type=proj_type), lr=1e-2,
                                        weight_decay=weight_decay, no_deprecation_warning=True)
    worst = 0.0
    for t in range(13):  # refreshes at steps 0, 3, 6, 9, 12
        train(ours_model, ours, 1, start=t)
        train(peer_model, peer, 1, start=t)
        for (name, a), b in zip(ours_model.named_parameters(), peer_model.parameters()):
            diff = (a - b).abs().max().item()
            worst = max(worst, diff)
            assert diff < TOLERANCE, f"step {t}: {name} differs by {diff}"
    print(f"max |ours - galore_torch| over 13 steps, proj_type={proj_type} = {worst:.2e}")
    assert ours.refresh_counts()["refreshes"] == 3 * 5
    # the side rule put each basis where galore-torch puts it: (m x r) on the left, (n x r) on the right
    sides = {"std": [False, False, True], "reverse_std": [True, True, False], "left": [True] * 3, "right": [False] * 3}
    for w, left in zip([ours_model.attn_square.weight, ours_model.mlp_tall.weight, ours_model.mlp_wide.weight],
                       sides[proj_type]):
        assert ours.state_of(w)["left"] == left and ours.state_of(w)["basis"].shape[0] == w.shape[0 if left else 1]
