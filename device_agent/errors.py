"""The one error type the agent reports: it becomes ``{"error": ..., "kind": ...}`` on stdout."""
from __future__ import annotations


class AgentError(Exception):
    """A failure the host can act on; ``kind`` is a stable machine-readable tag."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
        self.kind = kind
