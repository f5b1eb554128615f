"""A served run in a process of its own: the child trains (a Controller, as `reclra train`
does), the service keeps a handle that replays the child's callback hooks.

One run's out-of-memory kill, segfault or torch global (train.threads) can then reach that run
only; the service and every other run go on. The child relays every hook of
driver/run/callbacks.py through a pipe as (hook, arguments, RunSnapshot); the service side
replays them into its own callbacks (the Prometheus series, the API's watchers) against a
RemoteView built from the snapshots. A child that dies without reaching a terminal state is
marked failed here, with the cause (the signal, and the memory the run was estimated to need).

    service process                              run process (spawned)
    RunProcess.start() --- spawn -------------->  run_child(): Controller(callbacks=[Relay])
    reader thread  <------ (hook, args, snap) ---  Relay.<hook>() at every transition
    request_stop() ------- "stop" ------------->  listener thread: ctl.request_stop()
    watchdog: kill() past stop_timeout_s          exits when the run ends
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from driver.config import Config, config_to_dict
from driver.run import storage
from driver.run.callbacks import TERMINAL, Callback, RunState, RunView
from driver.run.controller import Controller, RunFailed
from driver.run.epochs import Epoch, Position
from driver.run.progress import Progress
from driver.run.run_log import RunLog
from driver.run.stats import StatsBook

log = logging.getLogger(__name__)
SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
HOOKS = (  # every hook of driver/run/callbacks.Callback (a test keeps the list whole)
    "after_transition",
    "after_epoch_start",
    "after_train_step",
    "after_stage_stats",
    "after_evaluation",
    "after_epoch",
    "after_checkpoint",
    "on_restart",
    "on_failure",
)


@dataclasses.dataclass(frozen=True)
class RunSnapshot:
    """What the service reads of a run: the API's Run fields and what its callbacks need."""

    state: str = RunState.PENDING.value
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batch: int = 0
    val_acc: float = 0.0
    test_acc: float = 0.0
    restarts: int = 0
    error: str = ""
    partition: tuple[int, ...] = ()
    exit_val_acc: tuple[float, ...] | None = None
    exit_test_acc: tuple[float, ...] | None = None


def is_uri(path: str) -> bool:
    return "://" in path


def snapshot(ctl: Controller) -> RunSnapshot:
    last = ctl.run.epochs[-1] if ctl.run.epochs else {}
    per_epoch = 0
    if ctl.splits is not None:
        per_epoch = -(-len(ctl.splits.train) // ctl.cfg.train.batch_size)  # type: ignore[arg-type]
    total = ctl.cfg.train.epochs * per_epoch
    if ctl.cfg.train.max_steps:
        total = min(total, ctl.cfg.train.max_steps) if total else ctl.cfg.train.max_steps
    run = ctl.run
    return RunSnapshot(
        state=ctl.state.value,
        step=run.steps,
        total_steps=total,
        epoch=ctl.pos.epoch,
        batch=ctl.pos.batch,
        val_acc=float(last.get("val_acc", 0.0)),
        test_acc=run.test_acc or 0.0,
        restarts=ctl.restarts,
        error=ctl.error or "",
        partition=tuple(run.partition),
        exit_val_acc=None if run.exit_val_acc is None else tuple(run.exit_val_acc),
        exit_test_acc=None if run.exit_test_acc is None else tuple(run.exit_test_acc),
    )


# -- the run's process ------------------------------------------------------------------------
class Relay(Callback):
    """The child's callback: every hook goes to the service as (hook, arguments, snapshot)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, ctl: RunView, hook: str, *args: Any) -> None:
        assert isinstance(ctl, Controller)
        with self.lock:
            self.conn.send((hook, args, snapshot(ctl)))

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        self.send(ctl, "after_transition", previous.value, current.value)

    def after_epoch_start(self, ctl: RunView) -> None:
        self.send(ctl, "after_epoch_start")

    def after_train_step(self, ctl: RunView, seconds: float, samples: int) -> None:
        self.send(ctl, "after_train_step", seconds, samples)

    def after_stage_stats(self, ctl: RunView, reports: list) -> None:
        self.send(ctl, "after_stage_stats", reports)

    def after_evaluation(
        self, ctl: RunView, split: str, acc: float, loss: float, *, periodic: bool
    ) -> None:
        self.send(ctl, "after_evaluation", split, acc, loss, periodic)

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        self.send(ctl, "after_epoch", entry)

    def after_checkpoint(self, ctl: RunView, path: Any) -> None:
        self.send(ctl, "after_checkpoint", str(path))

    def on_restart(self, ctl: RunView) -> None:
        self.send(ctl, "on_restart")

    def on_failure(self, ctl: RunView, exc: BaseException) -> None:
        self.send(ctl, "on_failure", f"{type(exc).__name__}: {exc}")


def run_child(
    cfg: Config, folder: str, run_id: str, events: Connection, control: Connection, level: int
) -> None:
    """The run process's entry point: train to the end, relaying every hook."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    relay = Relay(events)
    out: Any = folder if is_uri(folder) else Path(folder)
    ctl = Controller(cfg, out_dir=out, run_id=run_id, callbacks=[Progress(), relay])

    def listen() -> None:
        try:
            while control.recv() != "stop":
                pass
        except (EOFError, OSError):
            pass  # the service went away: stop as if asked, the run checkpoints first
        ctl.request_stop()

    threading.Thread(target=listen, name="stop-listener", daemon=True).start()
    try:
        ctl.run_to_end()
    except RunFailed:
        pass  # relayed: the failed transition carries the error
    finally:
        with relay.lock:
            events.close()


# -- the service's side -----------------------------------------------------------------------
class RemoteView:
    """A run as the service's callbacks see it (driver/run/callbacks.RunView), rebuilt from the
    child's snapshots: its curves live in the child and in metrics.json, not here."""

    def __init__(self, cfg: Config, run_id: str) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.snap = RunSnapshot()
        self.run = RunLog(rule=cfg.rule.label, config=config_to_dict(cfg))
        self.book = StatsBook()
        self.epoch: Epoch | None = None
        self.train_seconds = 0.0
        self.samples = 0
        self._t0 = time.perf_counter()

    def update(self, snap: RunSnapshot) -> None:
        self.snap = snap
        self.run.steps, self.run.test_acc = snap.step, snap.test_acc
        self.run.partition = list(snap.partition)
        self.run.exit_val_acc = None if snap.exit_val_acc is None else list(snap.exit_val_acc)
        self.run.exit_test_acc = None if snap.exit_test_acc is None else list(snap.exit_test_acc)

    @property
    def state(self) -> RunState:
        return RunState(self.snap.state)

    @property
    def pos(self) -> Position:
        return Position(self.snap.epoch, self.snap.batch)

    @property
    def restarts(self) -> int:
        return self.snap.restarts

    @property
    def error(self) -> str | None:
        return self.snap.error or None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


def death_cause(exitcode: int | None, estimate: str) -> str:
    """Why a run's process ended without its run ending, in one line."""
    if exitcode is None:
        return "its process could not be waited for"
    if exitcode >= 0:
        return f"its process exited with code {exitcode} before the run ended"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    told = f"its process was killed by signal {-exitcode} ({name})"
    if -exitcode == signal.SIGKILL:
        told += f"; likely out of memory: the run asked for {estimate}"
    elif -exitcode in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT):
        told += "; a native library crashed"
    return told


class RunProcess:
    """One served run's process, seen from the service: start, stop (gracefully within a
    deadline, killed past it), and the hooks it relays, replayed into `callbacks`."""

    def __init__(
        self,
        cfg: Config,
        folder: str,
        run_id: str,
        callbacks: Sequence[Callback],
        *,
        estimate: str = "an unknown amount of memory",
    ) -> None:
        self.cfg, self.folder, self.run_id = cfg, folder, run_id
        self.callbacks = list(callbacks)
        self.estimate = estimate
        self.view = RemoteView(cfg, run_id)
        self.process: Any = None
        self._control: Connection | None = None
        self._reader: threading.Thread | None = None
        self._ended = threading.Event()
        self._stop_deadline: float | None = None
        self._killed_on_stop = False

    @property
    def pid(self) -> int:
        p = self.process
        return p.pid if p is not None and p.is_alive() else 0

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def start(self, on_end: Any) -> None:
        """Spawn the run's process; `on_end()` is called once its run has ended, however."""
        events_recv, events_send = SPAWN.Pipe(duplex=False)
        control_recv, control_send = SPAWN.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        self.process = SPAWN.Process(
            target=run_child,
            args=(self.cfg, self.folder, self.run_id, events_send, control_recv, level),
            name=f"reclra-run-{self.run_id}",
            # not a daemon: a daemon may not start processes (DataLoader workers); if the
            # service dies, the child reads EOF on its control pipe and stops by itself
            daemon=False,
        )
        self.process.start()
        events_send.close()  # the child holds the only write end: EOF means it has gone
        control_recv.close()
        self._control = control_send
        self._reader = threading.Thread(
            target=self._read, args=(events_recv, on_end), name=f"run-{self.run_id}", daemon=True
        )
        self._reader.start()

    def cancel(self) -> None:
        """A run that never started: pending -> stopped, through a controller of its own (which
        writes the run log) and the callbacks; nothing is spawned."""
        ctl = Controller(
            self.cfg,
            out_dir=self.folder if is_uri(self.folder) else Path(self.folder),
            run_id=self.run_id,
            callbacks=[_Mirror(self)],
        )
        ctl.cancel()
        self._ended.set()

    def request_stop(self, timeout: float) -> None:
        """Ask the run to checkpoint and stop; kill its process if it has not ended within
        `timeout` seconds."""
        if self.process is None or self.ended:
            return
        try:
            assert self._control is not None
            self._control.send("stop")
        except (OSError, ValueError):
            pass  # the process is already gone; the reader reports how
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + timeout
            threading.Thread(target=self._watchdog, args=(timeout,), daemon=True).start()

    def _watchdog(self, timeout: float) -> None:
        if self._ended.wait(timeout):
            return
        log.warning("run %s did not stop within %.0f s; killing its process", self.run_id, timeout)
        self._killed_on_stop = True
        self.kill()

    def kill(self) -> None:
        p = self.process
        if p is not None and p.is_alive():
            p.kill()

    def join(self, timeout: float) -> bool:
        """Wait for the run to end (and its hooks to be replayed); False past the timeout."""
        return self._ended.wait(timeout)

    # -- replaying the child's hooks -----------------------------------------------------------
    def _read(self, conn: Connection, on_end: Any) -> None:
        try:
            while True:
                try:
                    hook, args, snap = conn.recv()
                except (EOFError, OSError):
                    break
                try:
                    self.replay(hook, args, snap)
                except Exception:  # an observer's failure must not lose the run's later events
                    log.exception("run %s: a callback failed on %s", self.run_id, hook)
            self.process.join(timeout=30)
            if self.view.state not in TERMINAL:
                self._died(self.process.exitcode)
        except Exception:
            log.exception("run %s: replaying its process's events failed", self.run_id)
            if self.view.state not in TERMINAL:
                self._died(None)
        finally:
            conn.close()
            if self._control is not None:
                self._control.close()
            self._ended.set()
            on_end()

    def replay(self, hook: str, args: tuple, snap: RunSnapshot) -> None:
        """One hook of the child's, replayed into this side's callbacks."""
        self.view.update(snap)
        if hook == "after_transition":
            args = (RunState(args[0]), RunState(args[1]))
        elif hook == "on_failure":
            args = (RuntimeError(args[0]),)
        elif hook == "after_evaluation":
            split, acc, loss, periodic = args
            for cb in self.callbacks:
                cb.after_evaluation(self.view, split, acc, loss, periodic=periodic)  # type: ignore[arg-type]
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self.view, *args)

    def _died(self, exitcode: int | None) -> None:
        """The process ended with its run still going: failed (or stopped, when it was killed
        past its stop deadline), told to the callbacks as if the run had entered it."""
        previous = self.view.state
        if self._killed_on_stop:
            state, error = RunState.STOPPED, "the run did not stop within its deadline; killed"
        else:
            state, error = RunState.FAILED, death_cause(exitcode, self.estimate)
        log.error("run %s %s: %s", self.run_id, state.value, error)
        self.view.update(dataclasses.replace(self.view.snap, state=state.value, error=error))
        _note_in_run_log(self.folder, self.cfg, error, state)
        if state is RunState.FAILED:
            for cb in self.callbacks:
                cb.on_failure(self.view, RuntimeError(error))  # type: ignore[arg-type]
        for cb in self.callbacks:
            cb.after_transition(self.view, previous, state)  # type: ignore[arg-type]


class _Mirror(Callback):
    """Passes a controller's transitions on to a RunProcess's callbacks (a cancelled run's)."""

    def __init__(self, proc: RunProcess) -> None:
        self.proc = proc

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        assert isinstance(ctl, Controller)
        self.proc.replay("after_transition", (previous.value, current.value), snapshot(ctl))


def _note_in_run_log(folder: str, cfg: Config, error: str, state: RunState) -> None:
    """Record in metrics.json why the run ended, where its process could not: the file keeps
    what the run wrote last (its epochs), with the error and final state added."""
    where = storage.join(storage.join(folder, cfg.rule.label), "metrics.json")
    try:
        body = json.loads(storage.read_bytes(where))
    except Exception:  # never written (it died before its first epoch), or unreadable
        body = {"rule": cfg.rule.label, "config": config_to_dict(cfg), "steps": 0}
    body["error"], body["state"] = error, state.value
    try:
        storage.write_bytes(where, json.dumps(body, indent=2, default=str).encode())
    except Exception:
        log.exception("run %s: cannot record its end in %s", cfg.rule.label, where)
