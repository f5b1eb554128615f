"""One actor per placement-group bundle; submit and gather with deadlines; tear down on failure."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.errors import ActorDied, ActorError, ActorTimeout, PlacementError
from cluster.placement import cluster_can_grow, never_fits, node_resources

log = logging.getLogger(__name__)


class ActorGroup:
    """`len(args)` actors of `cls`, actor i on bundle i of one placement group.

    Ray never restarts or retries them (a retried call could run out of order); failures
    surface as ActorError subclasses naming the actor's role and index. `cls` defines
    `ping() -> bool`, the liveness probe, which the group calls on a "control" thread of its
    own so that it answers while the actor's other calls run.
    """

    def __init__(
        self,
        cls: type,
        args: Sequence[tuple],
        *,
        cpus: float,
        gpus: float,
        strategy: str = "PACK",
        placement_timeout_s: float = 60.0,
        timeout_key: str,
        fixed_size: bool | None = None,
        role: str = "actor",
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        """`fixed_size`: True when the cluster cannot grow (a local Ray this process started),
        None to ask the cluster. A fixed cluster that can never fit the bundles fails at once;
        one that may grow is waited for up to `placement_timeout_s`. `timeout_key` (the caller's
        setting for that deadline) and `role` (what the caller calls one actor: "stage") name
        them in errors; `actor_options` go to ray.remote (a runtime_env,
        enable_tensor_transport)."""
        if not callable(getattr(cls, "ping", None)):
            raise TypeError(f"{cls.__name__}: an ActorGroup's actors define ping() -> bool")
        self.role = role
        many = f"{role}s"
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})} for _ in args]
        fix = f"lower the per-{role} resources or the number of {many}"
        if fixed_size if fixed_size is not None else not cluster_can_grow():
            why = never_fits(bundles, strategy, node_resources())
            if why:
                raise PlacementError(
                    f"cannot place {len(args)} {many} of {bundles[0]} ({strategy}): {why}, "
                    f"and this cluster cannot grow; {fix}, or add nodes"
                )
        self.pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            raise PlacementError(
                f"could not place {len(args)} {many} of {bundles[0]} within "
                f"{placement_timeout_s:g}s (cluster has {ray.available_resources()}); {fix}, "
                f"or raise {timeout_key}"
            ) from None
        # A "control" concurrency group answers probes while the default group (which keeps
        # every call in submission order) is busy or hung.
        remote: Any = ray.remote(  # type: ignore[call-overload]
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=0,
            max_task_retries=0,
            concurrency_groups={"control": 1},
            **(actor_options or {}),
        )(cls)
        self.actors = [
            remote.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                )
            ).remote(*a)
            for i, a in enumerate(args)
        ]
        self._alive = True

    def __len__(self) -> int:
        return len(self.actors)

    def collective(self, backend: str, timeout_s: float) -> str:
        """Join the actors in a collective group of `backend` (Ray Direct Transport's "gloo" or
        "nccl"); "" when done, else why not (the caller falls back to the object store)."""
        import threading

        from ray.experimental.collective import create_collective_group

        outcome: list[str] = []

        def create() -> None:
            try:
                create_collective_group(list(self.actors), backend=backend)
                outcome.append("")
            except Exception as exc:  # noqa: BLE001 - any failure means: no direct transport
                outcome.append(f"{type(exc).__name__}: {exc}")

        # Ray's call waits without a deadline: wait for it on a thread that may be abandoned
        worker = threading.Thread(target=create, daemon=True, name="collective-group")
        worker.start()
        worker.join(timeout_s)
        return outcome[0] if outcome else f"no answer within {timeout_s:g}s"

    def gather(
        self,
        refs: Sequence[tuple[int, ray.ObjectRef]],
        *,
        timeout_s: float,
        key: str,
        what: str = "call",
    ) -> list[Any]:
        """Results of `refs` ((actor index, ref) pairs) in order. The first failure raises an
        ActorError naming its actor; past the deadline, ActorTimeout names the first actor
        still working and the config key `key` that sets the deadline."""
        deadline = time.monotonic() + timeout_s
        pending = {ref: i for i, ref in refs}
        values: dict[ray.ObjectRef, Any] = {}
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not ready:
                stuck = self.unresponsive(sorted(set(pending.values())))
                first = stuck[0] if stuck else min(pending.values())
                raise ActorTimeout(
                    first,
                    f"{what} still running after {timeout_s:g}s; raise {key} if that is expected",
                    role=self.role,
                )
            ref = ready[0]
            values[ref] = self._check(pending.pop(ref), ref, what)
        return [values[ref] for _, ref in refs]

    def _probe(self, indices: Sequence[int], timeout_s: float) -> tuple[dict, set]:
        """A ping to each actor of `indices` on its control thread: (index -> ref, the refs
        answered within `timeout_s`, successfully or not)."""
        probes = {
            i: self.actors[i].ping.options(concurrency_group="control").remote() for i in indices
        }
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout_s)
        return probes, set(ready)

    def unresponsive(self, indices: Sequence[int], timeout_s: float = 3.0) -> list[int]:
        """Actors among `indices` that do not answer a probe: hung, not merely waiting for an
        upstream stage (a waiting or computing actor still answers on its control thread)."""
        probes, answered = self._probe(indices, timeout_s)
        return [i for i, ref in probes.items() if ref not in answered]

    def dead(self, timeout_s: float = 3.0) -> list[int]:
        """Actors whose probe fails (their process is gone)."""
        probes, answered = self._probe(range(len(self.actors)), timeout_s)
        gone = []
        for i, ref in probes.items():
            try:
                if ref in answered:
                    ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - any failure to answer a ping: gone
                gone.append(i)
        return gone

    def _check(self, i: int, ref: ray.ObjectRef, what: str) -> Any:
        """The value of the finished `ref`, or the actor's failure as an ActorError."""
        try:
            return ray.get(ref, timeout=0)
        except (ActorDiedError, RayActorError) as exc:
            # a call fails with the death of an actor whose result it took: name the dead one
            gone = self.dead()
            i = i if i in gone or not gone else gone[0]
            raise ActorDied(
                i, f"{what}: the actor died", type(exc).__name__, role=self.role
            ) from None
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, ActorError):
                raise cause from None
            error = f"{type(cause).__name__}: {cause}"
            # actors that message each other (p2p, collectives) fail when a peer dies, often
            # before Ray reports the death: a dead peer is the failure to recover from
            gone = [g for g in self.dead() if g != i]
            if gone:
                raise ActorDied(
                    gone[0],
                    f"{what}: the actor died",
                    f"{self.role} {i} failed meanwhile: {error}",
                    type(cause).__name__,
                    role=self.role,
                ) from None
            raise ActorError(
                i, f"{what} failed", error, type(cause).__name__, role=self.role
            ) from None

    def shutdown(self) -> None:
        """Kill every actor and free the placement group (idempotent)."""
        if not self._alive:
            return
        self._alive = False
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - best effort on a dying cluster
                log.debug("kill failed: %s", exc)
        try:
            remove_placement_group(self.pg)
        except Exception as exc:  # noqa: BLE001
            log.debug("placement group removal failed: %s", exc)

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
