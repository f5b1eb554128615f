"""One run's lifecycle: the controller, its callbacks, the run log, checkpoints, comparison."""
