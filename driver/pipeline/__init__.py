"""The pipeline: cutting the model into stages, the schedule, the stage handles, the stream
of micro-batches, and building the runner a config asks for."""
