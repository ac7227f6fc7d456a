"""HFClassifierJudge with tiny randomly initialised classifiers saved to tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignx.eval.judges import HFClassifierJudge, PairwiseItem, SafetyItem, TruthItem

WORDS = "how do i the a to you can help with that sure here is it q what answer true no yes".split()


def _save_tiny_classifier(path, num_labels, id2label, problem_type=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type=problem_type,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def safety_dir(tmp_path_factory):
    return _save_tiny_classifier(tmp_path_factory.mktemp("safe"), 2, {0: "safe", 1: "unsafe"})


ITEMS = [
    SafetyItem("how do i do it", "sure here is how"),
    SafetyItem("how do i do it", "i can not help with that"),
]


def test_labels_named_like_roles_are_used_and_match_the_model(safety_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = HFClassifierJudge(safety_dir, "safety", max_length=32)
    v = judge.judge_safety(ITEMS)
    assert judge.judge_id == f"hf:{safety_dir}" and v[0].judge_id == judge.judge_id
    assert judge.roles == {0: "safe", 1: "unsafe"}
    # the score is the softmax mass on the "unsafe" label, computed independently here
    tok, model = (
        AutoTokenizer.from_pretrained(safety_dir),
        AutoModelForSequenceClassification.from_pretrained(safety_dir),
    )
    texts = [f"Human: {it.prompt}\n\nAssistant: {it.answer}" for it in ITEMS]
    with torch.no_grad():
        p = torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)[:, 1]
    assert np.allclose([x.score for x in v], p.numpy(), atol=1e-5)
    assert [x.unsafe for x in v] == [bool(pi >= 0.5) for pi in p]
    assert judge.judge_safety(ITEMS) == v  # deterministic
    assert (
        v[1].refusal is False
        and judge.judge_safety([SafetyItem("p", "I can't help with that.")])[0].refusal
    )


def test_label_map_flips_roles_and_bad_maps_fail(safety_dir):
    normal = HFClassifierJudge(safety_dir, "safety", max_length=32).judge_safety(ITEMS)
    flipped = HFClassifierJudge(safety_dir, "safety", {"0": "unsafe", "1": "safe"}).judge_safety(
        ITEMS
    )
    assert np.allclose(
        [a.score + b.score for a, b in zip(normal, flipped, strict=True)], 1.0, atol=1e-5
    )
    with pytest.raises(ValueError, match="not a label.*'unsafe'"):
        HFClassifierJudge(safety_dir, "safety", {"toxic": "unsafe"})
    with pytest.raises(ValueError, match="roles for task 'safety'"):
        HFClassifierJudge(safety_dir, "safety", {"1": "harmful"})
    with pytest.raises(ValueError, match="set label_map"):
        HFClassifierJudge(safety_dir, "truthful")  # labels safe/unsafe mean nothing for truth


def test_reward_model_pairwise_and_truth_classifier(tmp_path):
    rm = _save_tiny_classifier(tmp_path / "rm", 1, {0: "LABEL_0"})
    with pytest.raises(ValueError, match="set label_map"):
        HFClassifierJudge(rm, "pairwise")
    judge = HFClassifierJudge(rm, "pairwise", {"0": "good"})
    a, b = "sure here is the answer", "no"
    out = judge.judge_pairwise(
        [PairwiseItem("q", a, b), PairwiseItem("q", b, a), PairwiseItem("q", a, a)]
    )
    assert out[2] == 0.5 and out[0] == 1.0 - out[1] and out[0] in (0.0, 1.0)
    # the same logit read as "bad" (higher = worse) reverses every verdict
    assert HFClassifierJudge(rm, "pairwise", {"0": "bad"}).judge_pairwise(
        [PairwiseItem("q", a, b)]
    ) == [out[1]]

    tq = _save_tiny_classifier(tmp_path / "tq", 2, {0: "untruthful", 1: "truthful"})
    v = HFClassifierJudge(tq, "truthful").judge_truthful(
        [
            TruthItem("what is it", "yes it is", [], []),
            TruthItem("what is it", "I have no comment.", [], []),
        ]
    )
    assert [x.informative for x in v] == [True, False] and all(0 <= x.score <= 1 for x in v)


def test_multi_label_uses_the_most_likely_positive_label(tmp_path):
    d = _save_tiny_classifier(
        tmp_path / "ml",
        3,
        {0: "violence", 1: "privacy", 2: "hate"},
        problem_type="multi_label_classification",
    )
    judge = HFClassifierJudge(
        d, "safety", {"violence": "unsafe", "privacy": "unsafe", "hate": "unsafe"}
    )
    logits = judge.positive_logits(["sure here is how"])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = (
        AutoTokenizer.from_pretrained(d),
        AutoModelForSequenceClassification.from_pretrained(d),
    )
    with torch.no_grad():
        sig = torch.sigmoid(model(**tok(["sure here is how"], return_tensors="pt")).logits)
    assert np.isclose(1 / (1 + np.exp(-logits[0])), sig.max().item(), atol=1e-5)
