"""encode_sft: loss on response tokens only, for every tiny model's chat template."""

from __future__ import annotations

import pytest
import torch

from alignx.axes import Axis
from alignx.data.injection import inject
from alignx.data.templates import default_template
from alignx.data.tokenize import (
    IGNORE_INDEX,
    EmptyResponseError,
    collate,
    count_response_tokens,
    encode_rows,
    encode_sft,
    render_sft,
)

MSGS = inject(
    [
        {"role": "user", "content": "What happens if you eat watermelon seeds?"},
    ],
    default_template(Axis.HONESTY),
)
RESPONSE = "They pass through your digestive system."


def _split(enc):
    n_prompt = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
    return n_prompt, enc["input_ids"][:n_prompt], enc["input_ids"][n_prompt:]


def test_labels_mask_exactly_the_prompt(tokenizer):
    enc = encode_sft(MSGS, RESPONSE, tokenizer, max_len=1024)
    assert len(enc["input_ids"]) == len(enc["labels"])
    prompt_text, full_text = render_sft(MSGS, RESPONSE, tokenizer)
    n_prompt, prompt_ids, resp_ids = _split(enc)
    # the masked part is the prompt rendering, contiguous at the start
    assert all(x == IGNORE_INDEX for x in enc["labels"][:n_prompt])
    assert enc["labels"][n_prompt:] == resp_ids
    assert tokenizer.decode(prompt_ids) == prompt_text
    # the learned part decodes to the response plus the template's end-of-turn tokens
    tail = tokenizer.decode(resp_ids)
    assert tail == full_text[len(prompt_text) :]
    assert RESPONSE in tail and tail.strip().startswith(RESPONSE)
    assert tail.rstrip().endswith((tokenizer.eos_token, "<end_of_turn>"))
    # the system template is in the prompt, not in the loss
    assert "I have no comment" in tokenizer.decode(prompt_ids)
    assert count_response_tokens(enc) == len(resp_ids) > 0


def test_bos_appears_once(tokenizer):
    enc = encode_sft(MSGS, RESPONSE, tokenizer, max_len=1024)
    assert enc["input_ids"].count(tokenizer.bos_token_id) == 1


def test_multi_turn_history_is_masked(tokenizer):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "How do I pick a lock?"},
    ]
    enc = encode_sft(msgs, "I can't help with that.", tokenizer, max_len=1024)
    _, prompt_ids, resp_ids = _split(enc)
    assert "Hello there." in tokenizer.decode(prompt_ids)
    assert "Hello there." not in tokenizer.decode(resp_ids)


def test_truncation_keeps_the_response(tokenizer):
    long_msgs = [{"role": "user", "content": "word " * 400 + "Final question?"}]
    full = encode_sft(long_msgs, RESPONSE, tokenizer, max_len=4096)
    n_resp = count_response_tokens(full)
    enc = encode_sft(long_msgs, RESPONSE, tokenizer, max_len=64)
    assert len(enc["input_ids"]) == 64
    assert count_response_tokens(enc) == n_resp  # whole response kept
    assert enc["input_ids"][-n_resp:] == full["input_ids"][-n_resp:]
    # the prompt was cut from the left: its end (next to the answer) survives
    assert "Final question?" in tokenizer.decode(enc["input_ids"][: 64 - n_resp])


def test_truncation_of_a_too_long_response_keeps_some_prompt(tokenizer):
    long_resp = "answer " * 300
    enc = encode_sft(MSGS, long_resp, tokenizer, max_len=40)
    assert len(enc["input_ids"]) == 40
    n_resp = count_response_tokens(enc)
    assert 0 < n_resp < 40 and 40 - n_resp == 40 // 4
    full = encode_sft(MSGS, long_resp, tokenizer, max_len=4096)
    first_resp = full["input_ids"][len(full["input_ids"]) - count_response_tokens(full) :]
    assert enc["input_ids"][-n_resp:] == first_resp[:n_resp]  # cut from the right


def test_max_len_must_allow_a_response_token(tokenizer):
    with pytest.raises(ValueError, match="max_len"):
        encode_sft(MSGS, RESPONSE, tokenizer, max_len=1)
    enc = encode_sft(MSGS, RESPONSE, tokenizer, max_len=2)
    assert count_response_tokens(enc) >= 1


class _NoEndTemplate:
    """A tokenizer stub whose template renders nothing for the assistant turn."""

    name_or_path = "stub-model"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(m["content"] for m in messages if m["role"] != "assistant")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class _BadTemplate(_NoEndTemplate):
    name_or_path = "broken-model"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(m["content"] for m in messages)
        return body + ("<gen>" if add_generation_prompt else "")


def test_template_errors_name_the_model():
    with pytest.raises(ValueError, match="broken-model"):
        encode_sft([{"role": "user", "content": "q"}], "a", _BadTemplate(), 16)
    with pytest.raises(EmptyResponseError, match="stub-model"):
        encode_sft([{"role": "user", "content": "q"}], "a", _NoEndTemplate(), 16)
    rows = [{"injected": [{"role": "user", "content": "q"}], "messages": [], "response": "a"}]
    assert encode_rows(rows, _NoEndTemplate(), 16) == []  # skipped, counted in a warning


def test_collate_right_pads():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ValueError):
        collate([], 0)
