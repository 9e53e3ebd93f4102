"""`dsv4c serve`: OpenAI- and Anthropic-compatible HTTP serving with continuous batching (see app.py,
scheduler.py)."""

from dsv4c.runtime.serve.scheduler import GenerationRequest, QueueFull, Scheduler

__all__ = ["GenerationRequest", "QueueFull", "Scheduler", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # the HTTP stack (and the chat encoding) only when asked for
        from dsv4c.runtime.serve.app import create_app

        return create_app
    raise AttributeError(name)
