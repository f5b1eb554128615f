"""The service's runs: safe run ids and folders, what a request may set, and admission.

At most service.max_active_runs runs train at once; later ones wait as `pending`, first in
first out, up to service.max_queued; finished runs stay in memory up to service.keep_finished
(their files always stay). No grpc here: errors are plain exceptions that
driver/api/service.py maps to status codes.
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

from driver.api.metrics import Metrics
from driver.api.metrics_callback import MetricsCallback
from driver.config import SECTIONS, Config, parse_config
from driver.config.service import ServiceConfig
from driver.run.callbacks import Callback, RunState, RunView
from driver.run.controller import Controller, RunFailed
from driver.run.progress import Progress

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RUN_ID_RULE = "1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"
# keys that name where a run writes: a request leaves them at their defaults
WRITE_SUFFIXES = ("_dir", "_path", "_uri", "_url", "_file")


class RunRefused(ValueError):
    """A request the service will not run as asked (INVALID_ARGUMENT)."""


class RunExists(ValueError):
    """The run id is taken, in memory or on disk (ALREADY_EXISTS)."""


class QueueFull(RuntimeError):
    """service.max_queued runs are already waiting (RESOURCE_EXHAUSTED)."""


class UnknownRun(LookupError):
    """No such run in memory (NOT_FOUND)."""


class Closing(RuntimeError):
    """The service is shutting down (UNAVAILABLE)."""


def is_uri(path: str) -> bool:
    return "://" in path


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


def check_request(cfg: Config) -> None:
    """Refuse what would let a request write outside its run's folder (or change the service)."""
    for section in SECTIONS:
        ours = getattr(cfg, section)
        base = type(ours)()
        for f in dataclasses.fields(ours):
            key, value = f"{section}.{f.name}", getattr(ours, f.name)
            if value == getattr(base, f.name):
                continue
            if section == "service":
                why = "a request cannot change the service's own settings (reclra serve sets them)"
            elif section != "data" and f.name.endswith(WRITE_SUFFIXES):
                why = "the service writes every run to service.runs_dir/<run_id>"
            elif key == "data.download":
                why = "the service only reads data.root; fetch the data beforehand"
            elif key == "cluster.runtime_env":
                why = "a request cannot install packages or set the environment of the workers"
            else:
                continue
            raise RunRefused(f"{key}: {why}; drop the key from the request")


class RunHandle(Callback):
    """One run: its controller (stepped in a thread once admitted), and a version counter
    watchers wait on (bumped at every transition: this handle is one of its callbacks)."""

    def __init__(self, run_id: str, cfg: Config, folder: str, runs: Runs) -> None:
        self.run_id, self.runs = run_id, runs
        self.version = 0
        self.cond = threading.Condition()
        # the state the API reports: set when this handle's own callback runs, after the run
        # log's (first in the list), so a watcher that sees "succeeded" finds metrics.json final
        self.state = RunState.PENDING
        out: Any = folder if is_uri(folder) else Path(folder)  # a URI goes to the storage layer
        observers = [] if runs.metrics is None else [MetricsCallback(runs.metrics, run_id)]
        self.ctl = Controller(
            cfg,
            out_dir=out,
            run_id=run_id,
            callbacks=[Progress(), *observers, self],
        )
        self.thread = threading.Thread(target=self._drive, name=f"run-{run_id}", daemon=True)

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        self.state = current
        self._bump()

    def _drive(self) -> None:
        try:
            self.ctl.run_to_end()
        except RunFailed:
            pass  # the controller logged it; GetRun and WatchRun report its state and error
        except Exception:
            log.exception("run %s: its controller raised", self.run_id)
        finally:
            self._bump()
            self.runs.ended(self)

    def cancel(self) -> None:
        """End a run that never started: pending -> stopped, through its callbacks."""
        try:
            self.ctl.cancel()
        except Exception:
            log.exception("run %s: a callback failed as it was stopped", self.run_id)

    def _bump(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()

    def fields(self) -> dict[str, Any]:
        """The run as the API's Run message's fields."""
        c = self.ctl
        last = c.run.epochs[-1] if c.run.epochs else {}
        per_epoch = 0
        if c.splits is not None:
            per_epoch = -(-len(c.splits.train) // c.cfg.train.batch_size)  # type: ignore[arg-type]
        total = c.cfg.train.epochs * per_epoch
        if c.cfg.train.max_steps:
            total = min(total, c.cfg.train.max_steps) if total else c.cfg.train.max_steps
        return dict(
            run_id=self.run_id,
            state=self.state.value,
            step=c.run.steps,
            total_steps=total,
            epoch=c.pos.epoch,
            val_acc=last.get("val_acc", 0.0),
            test_acc=c.run.test_acc or 0.0,
            restarts=c.restarts,
            error=c.error or "",
            out_dir=str(c.out),
        )


class Runs:
    """The runs this service holds: active ones, a FIFO queue of pending ones, and the newest
    service.keep_finished finished ones."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None) -> None:
        self.cfg, self.metrics = cfg, metrics
        # resolved once: a later change of directory must not move the runs
        self.root = cfg.runs_dir if is_uri(cfg.runs_dir) else str(Path(cfg.runs_dir).resolve())
        self.lock = threading.Lock()
        self.runs: dict[str, RunHandle] = {}  # every run held, in the order started
        self.queue: collections.deque[RunHandle] = collections.deque()
        self.active: dict[str, RunHandle] = {}
        self.finished: collections.deque[str] = collections.deque()
        self.closed = False

    def start(self, text: str, overrides: list[str], run_id: str) -> RunHandle:
        """A new run: started now if a slot is free, else queued as pending."""
        folder = run_folder(self.root, run_id) if run_id else ""
        cfg = parse_config(text, overrides, source="the request's config_toml")
        check_request(cfg)
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
            queued = len(self.active) >= self.cfg.max_active_runs
            if queued and len(self.queue) >= self.cfg.max_queued:
                raise QueueFull(
                    f"{len(self.queue)} runs are already waiting (service.max_queued = "
                    f"{self.cfg.max_queued}); retry when one has started, or raise the key"
                )
            train = dataclasses.replace(cfg.train, out_dir=folder, compare=())
            handle = RunHandle(run_id, dataclasses.replace(cfg, train=train), folder, self)
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

    def _admit(self, handle: RunHandle) -> None:
        self.active[handle.run_id] = handle
        handle.thread.start()

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
        handle.ctl.request_stop()
        return handle

    def ended(self, handle: RunHandle) -> None:
        """A run's thread ends: free its slot, start the next pending run."""
        with self.lock:
            self.active.pop(handle.run_id, None)
            self._forget_old(handle)
            while self.queue and len(self.active) < self.cfg.max_active_runs and not self.closed:
                self._admit(self.queue.popleft())

    def _forget_old(self, handle: RunHandle) -> None:
        self.finished.append(handle.run_id)
        while len(self.finished) > self.cfg.keep_finished:
            self.runs.pop(self.finished.popleft(), None)

    def close(self, timeout: float = 60.0) -> None:
        """Refuse new runs, stop pending ones, stop the active ones and wait for them."""
        with self.lock:
            self.closed = True
            pending, self.queue = list(self.queue), collections.deque()
            for handle in pending:
                handle.cancel()
                self._forget_old(handle)
            active = list(self.active.values())
        for handle in active:
            handle.ctl.request_stop()
        for handle in active:
            handle.thread.join(timeout=timeout)
