"""Stage 2 (train), data side: turn (injected) conversations into masked token sequences.

``encode_sft`` renders the conversation with the *model's own* chat template twice, once
up to the generation prompt and once with the target answer appended, and tokenizes the two
parts separately: the prompt part gets label ``-100`` (no loss), the remainder (the answer
plus whatever end-of-turn / eos tokens the template appends) is the loss target. This
works for every template in :mod:`alignx.models` without per-model code, and fails loudly
for a template whose full rendering does not extend its prompt rendering.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from alignx.data.schema import Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class EmptyResponseError(ValueError):
    """An example would have no response tokens to learn from."""


def _model_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def render_sft(
    messages: Sequence[Message], response: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str]:
    """Render the prompt and the full conversation with the tokenizer's chat template.

    Args:
        messages: the conversation (already injected if it should be), ending with a user turn.
        response: the target assistant answer.
        tokenizer: a tokenizer with a chat template.

    Returns:
        ``(prompt_text, full_text)``; ``full_text`` starts with ``prompt_text``.

    Raises:
        ValueError: the template's full rendering does not start with its prompt rendering
            (names the model).
    """
    msgs = [dict(m) for m in messages]
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"the chat template of model {_model_name(tokenizer)!r} renders a conversation with "
            "the answer that does not start with its rendering up to the generation prompt, so "
            "prompt and answer tokens cannot be separated; fix that model's chat_template "
            f"(alignx/models.py).\n  prompt: {prompt_text[-120:]!r}\n  full:   {full_text[-160:]!r}"
        )
    return prompt_text, full_text


def encode_sft(
    messages: list[Message], response: str, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, list[int]]:
    """Tokenize one SFT example with loss on the response tokens only.

    Truncation (when prompt + response exceed ``max_len``): the response is kept whole if it
    can be, the prompt is cut from the *left* (its end, next to the answer, stays); if the
    response alone is too long, the prompt keeps its last ``min(len(prompt), max_len // 4)``
    tokens and the response is cut from the right.

    Args:
        messages: the conversation (already injected if it should be), ending with a user turn.
        response: the target assistant answer.
        tokenizer: a tokenizer with a chat template (its bos is part of the template).
        max_len: the longest sequence to return (>= 2).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; ``labels`` is ``-100`` on
        prompt tokens and equals ``input_ids`` on response tokens.

    Raises:
        ValueError: ``max_len < 2``, or a chat template that cannot be split (see
            :func:`render_sft`).
        EmptyResponseError: the rendered response part has no tokens.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    prompt_text, full_text = render_sft(messages, response, tokenizer)
    prompt_ids: list[int] = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids: list[int] = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)[
        "input_ids"
    ]
    if not resp_ids:
        raise EmptyResponseError(
            f"response renders to zero tokens with model {_model_name(tokenizer)!r}: {response!r}"
        )
    if len(prompt_ids) + len(resp_ids) > max_len:
        keep_prompt = max(max_len - len(resp_ids), min(len(prompt_ids), max_len // 4))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
        resp_ids = resp_ids[: max_len - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + resp_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(resp_ids),
    }


def encode_rows(
    rows: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    injected: bool = True,
) -> list[dict[str, list[int]]]:
    """Encode prepared rows (from :func:`alignx.data.prepare.load_split`).

    Rows whose response renders to zero tokens are skipped and counted in a warning.

    Args:
        rows: dicts with decoded ``messages`` / ``injected`` lists and a ``response``.
        tokenizer: the model's tokenizer.
        max_len: see :func:`encode_sft`.
        injected: use the ``injected`` conversation (training) or the raw ``messages``
            (no-template evaluation).

    Returns:
        The encoded examples, in input order.
    """
    key = "injected" if injected else "messages"
    out: list[dict[str, list[int]]] = []
    skipped = 0
    for row in rows:
        try:
            out.append(encode_sft(row[key], row["response"], tokenizer, max_len))
        except EmptyResponseError:
            skipped += 1
    if skipped:
        log.warning("skipped %d example(s) whose response has no tokens", skipped)
    return out


def count_response_tokens(example: dict[str, Sequence[int]]) -> int:
    """Number of loss-bearing tokens of an encoded example.

    Args:
        example: an :func:`encode_sft` result.

    Returns:
        How many labels are not ``-100``.
    """
    return sum(1 for t in example["labels"] if t != IGNORE_INDEX)


def collate(batch: list[dict[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples.

    Args:
        batch: :func:`encode_sft` results.
        pad_id: the tokenizer's pad token id (used for ``input_ids``; labels pad with -100).

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask`` as ``(B, T)`` long tensors.

    Raises:
        ValueError: an empty batch.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(b["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
