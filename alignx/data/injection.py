"""Stage 1 (prepare) and serving: put an axis template into a conversation.

Injection happens on the message list, *before* the model's chat template is applied
(:func:`alignx.data.tokenize.encode_sft` at training time, the expert at serving time), so
the same function gives train/serve parity for every model's chat format.
"""

from __future__ import annotations

from collections.abc import Sequence

from alignx.data.schema import Message
from alignx.data.templates import PromptTemplate


def inject(messages: Sequence[Message], template: PromptTemplate) -> list[Message]:
    """Return a copy of ``messages`` with ``template.system`` as the first system message.

    If the conversation already starts with a system message, the two are merged into one
    system message, template text first, then a blank line, then the existing text (many
    chat templates accept a single system turn only).

    Args:
        messages: the conversation (not modified).
        template: the axis template.

    Returns:
        A new list of new message dicts.
    """
    return inject_system(messages, template.system)


def inject_system(messages: Sequence[Message], system: str) -> list[Message]:
    """:func:`inject` with a bare system text (baselines that inject no single axis template).

    Args:
        messages: the conversation (not modified).
        system: the text to put first in the system message.

    Returns:
        A new list of new message dicts.
    """
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        existing = out[0]["content"]
        merged = f"{system}\n\n{existing}" if existing else system
        out[0] = {"role": "system", "content": merged}
        return out
    return [{"role": "system", "content": system}, *out]
