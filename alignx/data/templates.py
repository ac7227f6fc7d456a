"""Stage 1 (prepare): the axis injection templates, as one versioned table.

METHOD.md, Stage 1: each training example is *injected* with an axis-specific instruction
(a system prompt) before the model's own chat template is applied. This module is the only
place the template text lives. A template is never edited in place: a new wording gets a
new id (``honesty/v2``) and :data:`DEFAULT_TEMPLATE_IDS` moves to it, so every data and
adapter manifest that recorded an id still names the exact text it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignx.axes import Axis

#: ``template_id`` recorded when ``data.inject`` is false (no system text was added).
NO_TEMPLATE_ID = "none"


@dataclass(frozen=True)
class PromptTemplate:
    """An axis instruction, injected as the system message.

    Attributes:
        id: versioned id, ``"<axis>/v<N>"``.
        axis: the axis it steers.
        system: the system-prompt text.
    """

    id: str
    axis: Axis
    system: str


_ALL: tuple[PromptTemplate, ...] = (
    PromptTemplate(
        "helpfulness/v1",
        Axis.HELPFULNESS,
        "You are a helpful assistant. Follow the user's instructions and give a complete, "
        "accurate and useful answer.",
    ),
    PromptTemplate(
        "harmlessness/v1",
        Axis.HARMLESSNESS,
        "You are a harmless assistant. If a request is unsafe, unethical or illegal, refuse "
        "it or redirect the user to a safe alternative, and briefly explain why. Never give "
        "information that could be used to cause harm.",
    ),
    PromptTemplate(
        "honesty/v1",
        Axis.HONESTY,
        "You are an honest assistant. Answer only with what is known to be true, and do not "
        "repeat common misconceptions. If you are not sure of the answer, say "
        '"I have no comment".',
    ),
)

#: Every template ever shipped, by id.
TEMPLATES: dict[str, PromptTemplate] = {t.id: t for t in _ALL}

#: The template each axis uses unless a config names another.
DEFAULT_TEMPLATE_IDS: dict[Axis, str] = {
    Axis.HELPFULNESS: "helpfulness/v1",
    Axis.HARMLESSNESS: "harmlessness/v1",
    Axis.HONESTY: "honesty/v1",
}


def get_template(template_id: str) -> PromptTemplate:
    """Look up a template by id.

    Args:
        template_id: e.g. ``"honesty/v1"``.

    Returns:
        The template.

    Raises:
        KeyError: naming the known ids, for an unknown id.
    """
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise KeyError(
            f"unknown template id {template_id!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None


def default_template(axis: Axis) -> PromptTemplate:
    """The current template of ``axis``.

    Args:
        axis: the axis.

    Returns:
        Its default :class:`PromptTemplate`.
    """
    return TEMPLATES[DEFAULT_TEMPLATE_IDS[axis]]
