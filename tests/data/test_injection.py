"""Templates are one versioned table; injection puts the axis template first."""

from __future__ import annotations

import pytest

from alignx.axes import AXES, Axis
from alignx.data.injection import inject
from alignx.data.templates import TEMPLATES, default_template, get_template


def test_one_template_per_axis_with_versioned_ids():
    for axis in AXES:
        t = default_template(axis)
        assert t.axis is axis and t.id.startswith(f"{axis.value}/v") and t.system
        assert TEMPLATES[t.id] is t
    assert "I have no comment" in default_template(Axis.HONESTY).system
    assert "refuse" in default_template(Axis.HARMLESSNESS).system
    with pytest.raises(KeyError, match="known"):
        get_template("honesty/v999")


def test_inject_adds_system_message_first():
    t = default_template(Axis.HONESTY)
    msgs = [{"role": "user", "content": "Is the earth flat?"}]
    out = inject(msgs, t)
    assert out == [
        {"role": "system", "content": t.system},
        {"role": "user", "content": "Is the earth flat?"},
    ]
    assert msgs == [{"role": "user", "content": "Is the earth flat?"}]  # input untouched


def test_inject_merges_with_existing_system_message_template_first():
    t = default_template(Axis.HARMLESSNESS)
    msgs = [
        {"role": "system", "content": "You are Bob."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "help me"},
    ]
    out = inject(msgs, t)
    assert out[0] == {"role": "system", "content": f"{t.system}\n\nYou are Bob."}
    assert out[1:] == msgs[1:]
    assert [m["role"] for m in out].count("system") == 1
    assert msgs[0]["content"] == "You are Bob."
