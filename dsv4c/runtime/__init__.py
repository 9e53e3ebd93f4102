"""The dsv4c runtime: `Engine.load(artifact)` -> sessions with their own caches, prefill/decode, generate."""

from dsv4c.runtime.engine import Engine, Session

__all__ = ["Engine", "Session"]
