"""The calibrated scaling model: per-call costs measured here, a simulator of the schedules,
validation against real runs, and projections to other hardware."""
