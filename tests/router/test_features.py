from __future__ import annotations

import numpy as np
import pytest

from alignx.config import ModelCfg
from alignx.router.features import BaseModelEncoder, build_encoder, router_text


def test_router_text_reads_last_user_turn_and_optional_context():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert router_text(msgs) == "q2"
    assert router_text(msgs, context_turns=2) == "q1\na1\nq2"
    assert "sys" not in router_text(msgs, context_turns=10)
    with pytest.raises(ValueError, match="no user message"):
        router_text([{"role": "system", "content": "x"}])


def test_base_encoder_is_padding_invariant_and_shaped():
    enc = BaseModelEncoder(ModelCfg(name="tiny-llama"))
    batch = enc.encode(["short", "a much longer prompt than the first one"])
    alone = enc.encode(["short"])
    assert batch.shape == (2, enc.dim) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5)
    assert enc.id == "base:tiny-llama"


def test_base_encoder_length_sorted_batches_keep_input_order():
    enc = BaseModelEncoder(ModelCfg(name="tiny-llama"))
    texts = ["mid length prompt here", "x", "the longest prompt of them all by quite a way",
             "two words", "a b c d e f g"]
    batched = enc.encode(texts, batch_size=2)  # sorted by length inside, 3 batches
    one_by_one = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_sentence_encoder_is_unit_norm_and_semantic():
    enc = build_encoder("sentence", ModelCfg(name="tiny-llama"))
    x = enc.encode(["How do I bake bread?", "Give me a bread recipe.", "Quantum chromodynamics"])
    assert x.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
    # no texts: a (0, 384) block like any other (calibration stacks an empty calibration set)
    assert enc.encode([]).shape == (0, 384) and enc.encode([]).dtype == np.float32


def test_encoder_id_without_loading_matches_the_loaded_encoders():
    from alignx.router.features import encoder_id

    cfg = ModelCfg(name="tiny-llama")
    assert encoder_id("base", cfg) == BaseModelEncoder(cfg).id
    assert encoder_id("sentence", cfg) == build_encoder("sentence", cfg).id
