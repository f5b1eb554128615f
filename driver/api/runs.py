"""The service's runs: safe run ids and folders, the queue, and each run's process.

What a request must pass to be admitted is driver/api/admission.py; each admitted run trains
in a process of its own (driver/api/run_process.py). At most service.max_active_runs runs train
at once; later ones wait as `pending`, first in first out, up to service.max_queued; finished
runs stay in memory, and in /metrics, up to service.keep_finished (their files always stay).
No grpc here: errors are plain exceptions that driver/api/service.py maps to status codes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import threading
import uuid
from pathlib import Path
from typing import Any

from driver.api.admission import RunRefused, admit, data_roots, memory_budget
from driver.api.metrics import Metrics
from driver.api.metrics_callback import MetricsCallback
from driver.api.run_process import RunProcess, is_uri
from driver.config import Config, parse_config
from driver.config.service import ServiceConfig
from driver.run.callbacks import TERMINAL, Callback, RunState, RunView
from driver.run.memory import MemoryEstimate
from driver.run.storage import join as storage_join

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RUN_ID_RULE = "1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"


class RunExists(ValueError):
    """The run id is taken, in memory or on disk (ALREADY_EXISTS)."""


class QueueFull(RuntimeError):
    """service.max_queued runs are already waiting (RESOURCE_EXHAUSTED)."""


class UnknownRun(LookupError):
    """No such run in memory (NOT_FOUND)."""


class Closing(RuntimeError):
    """The service is shutting down (UNAVAILABLE)."""


def check_run_id(run_id: str) -> str:
    if RUN_ID.fullmatch(run_id) is None or not run_id.strip("."):
        shown = repr(run_id[:70]) + ("..." if len(run_id) > 70 else "")
        raise RunRefused(
            f"run_id {shown}: must be {RUN_ID_RULE}; "
            "pick such an id or leave it empty for a generated one"
        )
    return run_id


def run_folder(runs_dir: str, run_id: str) -> str:
    """runs_dir/run_id, refused unless it lies under runs_dir (a URI: the id's pattern, which
    has no "/", is enough)."""
    check_run_id(run_id)
    if is_uri(runs_dir):
        return f"{runs_dir.rstrip('/')}/{run_id}"
    root = Path(runs_dir).resolve()
    folder = root / run_id
    if folder.is_symlink() or not folder.resolve().is_relative_to(root):
        raise RunRefused(
            f"run_id {run_id!r}: {folder} is a link that may lead outside service.runs_dir; "
            "pick another id"
        )
    return str(folder)


class RunHandle(Callback):
    """One run: its process (driver/api/run_process.py, spawned once admitted), and a version
    counter watchers wait on (bumped at every transition: this handle is one of the callbacks
    its process's hooks are replayed into)."""

    def __init__(
        self, run_id: str, cfg: Config, folder: str, runs: Runs, estimate: MemoryEstimate
    ) -> None:
        self.run_id, self.runs = run_id, runs
        self.memory = estimate.total  # what admission counts while the run is active
        self.version = 0
        self.cond = threading.Condition()
        # the state the API reports: a terminal one only once the run's process has exited (its
        # run log is final, its slot free, its memory returned)
        self.state = RunState.PENDING
        observers = [] if runs.metrics is None else [MetricsCallback(runs.metrics, run_id)]
        self.proc = RunProcess(cfg, folder, run_id, [*observers, self], estimate=estimate.line())
        self.out_dir = storage_join(folder, cfg.rule.label)

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        if current in TERMINAL and self.proc.process is not None:
            return  # told once its process has gone and its slot is free (_ended)
        self.state = current
        self._bump()

    def start(self) -> None:
        self.proc.start(on_end=self._ended)

    def _ended(self) -> None:
        self.state = self.proc.view.state
        self.runs.ended(self)
        self._bump()

    def cancel(self) -> None:
        """End a run that never started: pending -> stopped, through its callbacks."""
        try:
            self.proc.cancel()
        except Exception:
            log.exception("run %s: a callback failed as it was stopped", self.run_id)

    def _bump(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()

    def fields(self) -> dict[str, Any]:
        """The run as the API's Run message's fields."""
        snap = self.proc.view.snap
        return dict(
            run_id=self.run_id,
            state=self.state.value,
            step=snap.step,
            total_steps=snap.total_steps,
            epoch=snap.epoch,
            val_acc=snap.val_acc,
            test_acc=snap.test_acc,
            restarts=snap.restarts,
            error=snap.error,
            out_dir=str(self.out_dir),
            pid=self.proc.pid,
            memory_estimate=self.proc.estimate,
        )


class Runs:
    """The runs this service holds: active ones, a FIFO queue of pending ones, and the newest
    service.keep_finished finished ones."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None) -> None:
        self.cfg, self.metrics = cfg, metrics
        # resolved once: a later change of directory must not move the runs
        self.root = cfg.runs_dir if is_uri(cfg.runs_dir) else str(Path(cfg.runs_dir).resolve())
        self.data_roots = data_roots(cfg)
        self.budget = memory_budget(cfg)
        self.lock = threading.Lock()
        self.runs: dict[str, RunHandle] = {}  # every run held, in the order started
        self.queue: collections.deque[RunHandle] = collections.deque()
        self.active: dict[str, RunHandle] = {}
        self.finished: collections.deque[str] = collections.deque()
        self.closed = False

    def start(self, text: str, overrides: list[str], run_id: str) -> RunHandle:
        """A new run: started now if a slot and its memory are free, else queued as pending."""
        folder = run_folder(self.root, run_id) if run_id else ""
        cfg = parse_config(text, overrides, source="the request's config_toml")
        estimate = admit(cfg, self.data_roots, self.budget)
        with self.lock:
            if self.closed:
                raise Closing("the service is shutting down; start the run elsewhere or later")
            if not run_id:
                run_id = self._new_id()
                folder = run_folder(self.root, run_id)
            if run_id in self.runs:
                raise RunExists(f"run_id {run_id!r} exists; pick another or leave it empty")
            if not is_uri(folder) and Path(folder).exists():
                raise RunExists(
                    f"run_id {run_id!r}: {folder} holds an earlier run's files; "
                    "pick another id or leave it empty"
                )
            queued = bool(self.queue) or not self._fits(estimate.total)
            if queued and len(self.queue) >= self.cfg.max_queued:
                raise QueueFull(
                    f"{len(self.queue)} runs are already waiting (service.max_queued = "
                    f"{self.cfg.max_queued}); retry when one has started, or raise the key"
                )
            train = dataclasses.replace(cfg.train, out_dir=folder, compare=())
            handle = RunHandle(
                run_id, dataclasses.replace(cfg, train=train), folder, self, estimate
            )
            self.runs[run_id] = handle
            if queued:
                self.queue.append(handle)
            else:
                self._admit(handle)
        return handle

    def _new_id(self) -> str:
        while True:
            run_id = uuid.uuid4().hex[:12]
            if run_id not in self.runs and not Path(self.root, run_id).exists():
                return run_id

    def _fits(self, memory: int) -> bool:
        """Whether a run needing `memory` bytes may start now: a slot is free, and its estimate
        fits the memory budget beside the active runs' (one run over the budget alone was
        refused at admission; one that fits alone waits for the others to end)."""
        used = sum(h.memory for h in self.active.values())
        return len(self.active) < self.cfg.max_active_runs and used + memory <= self.budget

    def _admit(self, handle: RunHandle) -> None:
        self.active[handle.run_id] = handle
        handle.start()

    def get(self, run_id: str) -> RunHandle:
        with self.lock:
            handle = self.runs.get(run_id)
        if handle is not None:
            return handle
        try:
            folder = run_folder(self.root, run_id)
        except ValueError:
            folder = ""
        if folder and not is_uri(folder) and Path(folder).exists():
            raise UnknownRun(
                f"run {run_id!r} has ended and is no longer held in memory (service.keep_finished"
                f" = {self.cfg.keep_finished}); its files stay in {folder}"
            )
        raise UnknownRun(f"no run {run_id!r}; ListRuns shows them")

    def all(self) -> list[RunHandle]:
        with self.lock:
            return list(self.runs.values())

    def stop(self, run_id: str) -> RunHandle:
        """A pending run leaves the queue as stopped; an active one checkpoints, then stops."""
        handle = self.get(run_id)
        with self.lock:
            if handle in self.queue:
                self.queue.remove(handle)
                handle.cancel()
                self._forget_old(handle)
                return handle
        handle.proc.request_stop(self.cfg.stop_timeout_s)
        return handle

    def ended(self, handle: RunHandle) -> None:
        """A run's process has ended: free its slot, start the next pending run."""
        with self.lock:
            self.active.pop(handle.run_id, None)
            self._forget_old(handle)
            while self.queue and self._fits(self.queue[0].memory) and not self.closed:
                self._admit(self.queue.popleft())

    def _forget_old(self, handle: RunHandle) -> None:
        """Count `handle` as finished; past service.keep_finished, the oldest finished runs
        leave memory, and /metrics with them (every series labelled with their run id)."""
        self.finished.append(handle.run_id)
        while len(self.finished) > self.cfg.keep_finished:
            run_id = self.finished.popleft()
            self.runs.pop(run_id, None)
            if self.metrics is not None:
                self.metrics.forget_run(run_id)

    def close(self) -> None:
        """Refuse new runs, stop pending ones, stop the active ones and wait for them (each is
        killed past service.stop_timeout_s)."""
        with self.lock:
            self.closed = True
            pending, self.queue = list(self.queue), collections.deque()
            for handle in pending:
                handle.cancel()
                self._forget_old(handle)
            active = list(self.active.values())
        for handle in active:
            handle.proc.request_stop(self.cfg.stop_timeout_s)
        for handle in active:  # the watchdog kills at the deadline; the reader then ends
            handle.proc.join(self.cfg.stop_timeout_s + 60.0)
