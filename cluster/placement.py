"""Whether a placement group can ever fit a cluster's nodes, and whether the cluster can grow."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import ray

Resources = Mapping[str, float]


def _fits(bundle: Resources, node: Resources) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def never_fits(bundles: Sequence[Resources], strategy: str, nodes: Sequence[Resources]) -> str:
    """Why `bundles` can never be placed on `nodes` (each node's total resources) under
    `strategy`, or "" when some placement exists. Exact for STRICT_PACK and STRICT_SPREAD;
    for PACK and SPREAD (any bundle on any node) it checks that every bundle fits some node and
    that each resource's total suffices, which Ray's bin packing may still not achieve."""
    if not bundles:
        return ""
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
        return "" if any(_fits(total, n) for n in nodes) else f"no node holds all of {total}"
    if strategy == "STRICT_SPREAD":
        if not _matching(bundles, nodes):
            return f"fewer than {len(bundles)} nodes can each hold one of {list(bundles)}"
        return ""
    for b in bundles:
        if not any(_fits(b, n) for n in nodes):
            return f"no node can hold {dict(b)}"
    for key in {k for b in bundles for k in b}:
        need = sum(b.get(key, 0.0) for b in bundles)
        have = sum(n.get(key, 0.0) for n in nodes)
        if need > have + 1e-9:
            return f"{need:g} {key} asked for, the cluster has {have:g}"
    return ""


def _matching(bundles: Sequence[Resources], nodes: Sequence[Resources]) -> bool:
    """A distinct node for every bundle (bipartite matching, augmenting paths)."""
    owner: dict[int, int] = {}

    def place(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n not in seen and _fits(bundles[b], node):
                seen.add(n)
                if n not in owner or place(owner[n], seen):
                    owner[n] = b
                    return True
        return False

    return all(place(b, set()) for b in range(len(bundles)))


def node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def cluster_can_grow() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster: autoscaler v2 says so in
    the GCS, and a v1 autoscaler reports node types other than the read-only ones `ray start`
    describes when nothing can scale."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        v2 = _internal_kv_get(
            ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,  # type: ignore[attr-defined]
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,  # type: ignore[attr-defined]
        )
        if v2 == b"1":
            return True
        raw = _internal_kv_get("__autoscaling_status")
    except Exception:  # noqa: BLE001 - an unknown cluster may grow: keep waiting, to the deadline
        return True
    if not raw:  # no report yet (a head that just started): it may still grow
        return True
    report = json.loads(raw).get("autoscaler_report") or {}
    types = set(report.get("pending_launches", {})) | {
        t for t, _ in (report.get("active_nodes") or {}).items()
    }
    return any(not str(t).startswith("node_") for t in types)
