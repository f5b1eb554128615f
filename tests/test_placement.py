"""Whether a placement can ever fit a fixed cluster (pure: node totals in, reason out)."""

from __future__ import annotations

import pytest

from cluster.placement import never_fits

TWO_NODES = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]


@pytest.mark.parametrize(
    "bundles, strategy, why",
    [
        ([{"CPU": 1.0}] * 6, "PACK", ""),
        ([{"CPU": 1.0}] * 7, "PACK", "7 CPU asked for, the cluster has 6"),
        ([{"CPU": 5.0}], "SPREAD", "no node can hold {'CPU': 5.0}"),
        ([{"CPU": 1.0, "GPU": 1.0}] * 2, "PACK", "2 GPU asked for, the cluster has 1"),
        ([{"CPU": 1.0, "GPU": 0.5}] * 2, "PACK", ""),
        ([{"CPU": 3.0}, {"CPU": 2.0}], "STRICT_SPREAD", ""),
        ([{"CPU": 3.0}, {"CPU": 3.0}], "STRICT_SPREAD", "fewer than 2 nodes"),
        ([{"CPU": 1.0}] * 3, "STRICT_SPREAD", "fewer than 3 nodes"),
        ([{"CPU": 2.0}, {"CPU": 2.0}], "STRICT_PACK", ""),
        ([{"CPU": 3.0}, {"CPU": 2.0}], "STRICT_PACK", "no node holds all of {'CPU': 5.0}"),
        ([], "PACK", ""),
    ],
)
def test_never_fits(bundles, strategy, why):
    got = never_fits(bundles, strategy, TWO_NODES)
    assert (got == "") == (why == "") and why in got


def test_strict_spread_finds_the_matching_a_greedy_pass_would_miss():
    # bundle 0 fits both nodes, bundle 1 only node 0: a greedy first-fit gives node 0 to
    # bundle 0 and fails; the matching gives it node 1
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}]
    assert never_fits([{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], "STRICT_SPREAD", nodes) == ""
