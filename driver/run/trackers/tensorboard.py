"""The TensorBoard tracker: event files in train.out_dir/<rule>/tb (extra reclra[tensorboard]).

Scalars go through torch's SummaryWriter; the resolved config is a text summary ("config",
the TOML `reclra config` prints) and the run's hparams (every key, each compared with the
final/ scalars in the HParams dashboard); the end state is a text summary ("outcome"). A
restart writes a session start at the step training goes on from, so TensorBoard drops the
points the replay writes again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from driver.config import Config, ConfigError
from driver.config.docs import describe, toml_value
from driver.run import storage
from driver.run.callbacks import RunState
from driver.run.storage import Location
from driver.run.trackers.series import params


class TensorBoardSink:
    """Event files in `logdir` (run.trackers.series.Sink)."""

    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.where = str(logdir)
        self.writer: Any = None
        self.hparams: dict[str, Any] = {}

    @classmethod
    def under(cls, out: Location) -> TensorBoardSink:
        """The sink of a run writing to `out`: its tb/ folder, which must be local."""
        if storage.is_remote(out):
            raise ConfigError(
                f"train.trackers: tensorboard writes its event files to a local folder, but the "
                f"run writes to {out}; set train.out_dir to a local path or drop tensorboard "
                "from train.trackers"
            )
        return cls(Path(out) / "tb")

    def open(self, cfg: Config, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir))
        toml = describe(cfg)
        self.writer.add_text("config", "\n".join("    " + ln for ln in toml.splitlines()))
        self.hparams = {k: _hparam(v) for k, v in params(cfg).items()}

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def restart(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        # TensorBoard forgets every point past `step`: the replay writes them again
        start = Event(step=step + 1, wall_time=time.time())
        start.session_log.status = SessionLog.START
        self.writer.file_writer.add_event(start)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, state: RunState, error: str | None, final: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        outcome = state.value if error is None else f"{state.value}: {error}"
        self.writer.add_text("outcome", outcome)
        for summary in hparams(self.hparams, final):  # the final/ scalars are its metrics
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def _hparam(value: Any) -> Any:
    """A config value as TensorBoard's hparams take it: a number or a string (booleans, lists
    and tables as their TOML text)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return value
    return toml_value(value)
