"""dsv4c: compile DeepSeek-V4 checkpoints into deployable engines."""

__version__ = "0.1.0"
