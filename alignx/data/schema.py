"""Stage 1 (prepare): the record types every data module passes around.

A source reader (:mod:`alignx.data.sources`) turns raw rows into :class:`Example` objects:
a conversation that ends with a user turn plus the target assistant answer. The axis
template is *not* part of an ``Example``; it is added later by
:func:`alignx.data.injection.inject`, so the raw conversation stays available for
no-template evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignx.axes import Axis

#: One chat turn: ``{"role": "system" | "user" | "assistant", "content": str}``.
Message = dict[str, str]

ROLES: tuple[str, ...] = ("system", "user", "assistant")


def validate_messages(messages: tuple[Message, ...] | list[Message]) -> None:
    """Check that ``messages`` is a well-formed conversation ending with a user turn.

    Args:
        messages: the turns to check.

    Raises:
        ValueError: empty conversation, a turn that is not a ``{role, content}`` dict of
            strings, an unknown role, or a last turn that is not ``user``.
    """
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"message {i} must be a dict with exactly 'role' and 'content': {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (valid: {ROLES})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content'])}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be a user turn, got {messages[-1]['role']!r}")


@dataclass(frozen=True)
class Example:
    """One supervised example of one axis.

    Attributes:
        axis: the axis this example trains or evaluates.
        messages: the conversation, ending with a user turn (no axis template in it).
        response: the target assistant answer.
        source: the source name (``alpaca``, ``beavertails``, ``hh_rlhf``, ``truthfulqa``).
        uid: a stable id, unique within the source, e.g. ``"alpaca:123"``.
        meta: source-specific extras (reference answers, MC targets, categories ...);
            JSON-serialisable.
    """

    axis: Axis
    messages: tuple[Message, ...]
    response: str
    source: str
    uid: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_messages(self.messages)
        if not isinstance(self.response, str):
            raise ValueError(f"{self.uid}: response must be a string, got {type(self.response)}")

    @property
    def prompt(self) -> str:
        """The content of the last user message (what the router sees)."""
        return self.messages[-1]["content"]
