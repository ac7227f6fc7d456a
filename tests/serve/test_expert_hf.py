"""HFBackend and AxisExpert on the tiny random Llama (CPU, no Ray)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch

from alignx.artifacts import ArtifactMismatchError
from alignx.axes import Axis
from alignx.serve.backend import HFBackend, SamplingParams
from alignx.serve.expert import AxisExpert, PromptTooLongError
from alignx.serve.schemas import GenerateRequest

_spec = importlib.util.spec_from_file_location("serve_conftest", Path(__file__).with_name(
    "conftest.py"))
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)

PROMPTS = ["hi there", "What is the capital of France? Tell me more.", "Write a poem"]


@pytest.fixture(scope="module")
def backend(tiny_model_cfg):
    from alignx.modeling import load_base

    model, tok = load_base(tiny_model_cfg)
    return HFBackend(model, tok)


def _templated(backend, texts):
    return [backend.tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                            add_generation_prompt=True) for t in texts]


def test_greedy_is_deterministic_and_batch_equals_singles(backend):
    prompts = _templated(backend, PROMPTS)
    sp = SamplingParams(max_tokens=8)
    batch = backend.generate(prompts, [sp] * 3)
    assert batch == backend.generate(prompts, [sp] * 3)
    assert batch == [backend.generate([p], [sp])[0] for p in prompts]
    for c, p in zip(batch, prompts, strict=False):
        assert c.prompt_tokens == backend.count_tokens(p)
        assert c.completion_tokens <= 8


def test_max_tokens_honoured_per_row(backend):
    prompts = _templated(backend, PROMPTS)
    out = backend.generate(prompts, [SamplingParams(max_tokens=n) for n in (1, 3, 6)])
    for c, n in zip(out, (1, 3, 6), strict=False):
        assert c.completion_tokens <= n
        if c.finish_reason == "length":
            assert c.completion_tokens == n


def test_stop_strings_cut_and_finish_reason(backend):
    p = _templated(backend, PROMPTS[1:2])[0]
    full = backend.generate([p], [SamplingParams(max_tokens=12)])[0]
    assert len(full.text) >= 4, full
    stop = full.text[2:4]
    cut = backend.generate([p], [SamplingParams(max_tokens=12, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens <= full.completion_tokens
    streamed = list(backend.stream(p, SamplingParams(max_tokens=12, stop=(stop,))))
    assert streamed[-1] == cut
    assert "".join(s for s in streamed[:-1]) == cut.text


def test_stream_equals_generate_under_greedy(backend):
    p = _templated(backend, PROMPTS[:1])[0]
    sp = SamplingParams(max_tokens=10)
    items = list(backend.stream(p, sp))
    final = items[-1]
    assert final == backend.generate([p], [sp])[0]
    assert "".join(items[:-1]) == final.text


def test_mixed_sampling_settings_in_one_call(backend):
    prompts = _templated(backend, PROMPTS)
    torch.manual_seed(0)
    out = backend.generate(prompts, [SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9),
                                     SamplingParams(max_tokens=4),
                                     SamplingParams(max_tokens=2, temperature=1.5, top_p=0.5)])
    assert len(out) == 3 and out[1] == backend.generate([prompts[1]], [SamplingParams(4)])[0]


# ----------------------------------------------------------------------------- AxisExpert


def _req(text="Is it true that bulls hate red?", **kw):
    return GenerateRequest(messages=[{"role": "user", "content": text}],
                           **{"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, **kw})


@pytest.fixture(scope="module")
def honesty_expert(tiny_run_dir, tiny_model_cfg):
    return AxisExpert(Axis.HONESTY, tiny_run_dir, tiny_model_cfg, max_prompt_tokens=200)


def test_expert_injects_its_axis_template(honesty_expert):
    from alignx.data.templates import get_template

    prompt = honesty_expert._prompt(honesty_expert._state, _req("hello"))
    assert get_template("honesty/v1").system in prompt
    assert prompt.startswith("<s>[INST]") and "hello" in prompt


def test_expert_generate_and_batch_agree(honesty_expert):
    single = asyncio.run(honesty_expert.generate(_req()))
    batch = asyncio.run(honesty_expert.generate_batch([_req(), _req("Write a poem")]))
    assert single.text == batch[0].text and single.completion_tokens == batch[0].completion_tokens
    assert single.provenance.adapter == "honesty"
    assert single.provenance.run == str(Path(honesty_expert.provenance.run))


def test_expert_stream(honesty_expert):
    async def collect():
        return [d async for d in honesty_expert.generate_stream(_req())]

    items = asyncio.run(collect())
    assert items[-1].final is not None
    assert "".join(d.text for d in items[:-1]) == items[-1].final.text


def test_expert_refuses_long_prompt(honesty_expert):
    with pytest.raises(PromptTooLongError):
        asyncio.run(honesty_expert.generate(_req("word " * 400)))


def test_adapters_differ_per_axis(tiny_run_dir, tiny_model_cfg, honesty_expert):
    harm = AxisExpert(Axis.HARMLESSNESS, tiny_run_dir, tiny_model_cfg)
    a = asyncio.run(harm.generate(_req(max_tokens=12)))
    b = asyncio.run(honesty_expert.generate(_req(max_tokens=12)))
    assert a.provenance.adapter == "harmlessness" and b.provenance.adapter == "honesty"


def test_expert_refuses_other_base_model(tiny_run_dir):
    from alignx.config import ModelCfg

    with pytest.raises(ArtifactMismatchError, match="tiny-llama"):
        AxisExpert(Axis.HONESTY, tiny_run_dir, ModelCfg(name="tiny-mistral"))


def test_reconfigure_swaps_run_without_dropping_in_flight(tiny_run_dir, tiny_model_cfg,
                                                          tmp_path):
    run_b = _conf.make_run_dir(tmp_path / "run-b", seed=1)
    expert = AxisExpert(Axis.HONESTY, tiny_run_dir, tiny_model_cfg)

    async def scenario():
        inflight = [asyncio.create_task(expert.generate(_req(max_tokens=16))) for _ in range(3)]
        await asyncio.sleep(0)
        await expert.reconfigure({"run_dir": str(run_b)})
        after = await expert.generate(_req())
        return await asyncio.gather(*inflight), after

    before, after = asyncio.run(scenario())
    assert all(r.provenance.run == str(tiny_run_dir) for r in before)  # none dropped
    assert after.provenance.run == str(run_b) and after.provenance.config_hash == "seed1"
    asyncio.run(expert.reconfigure({"run_dir": str(run_b)}))  # unchanged: no-op
    assert expert.provenance.run == str(run_b)


def test_shared_arrays_model_matches_private_copy(tiny_model_cfg):
    from alignx.modeling import load_base
    from alignx.serve.weights import _arrays, build_on_arrays

    model, tok = load_base(tiny_model_cfg)
    arrays = _arrays(model)
    shared = build_on_arrays(tiny_model_cfg, arrays)
    x = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, shared(**x).logits)
    emb = shared.get_input_embeddings().weight
    assert emb.data_ptr() == torch.from_numpy(arrays["p:model.embed_tokens.weight"]).data_ptr()
