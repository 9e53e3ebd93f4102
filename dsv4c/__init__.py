"""dsv4c: compile DeepSeek-V4 checkpoints into deployable engines."""

from dsv4c._version import __version__

__all__ = ["__version__"]
