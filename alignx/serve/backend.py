"""Serving: the generation engine seam of an axis expert.

:class:`GenerationBackend` is what :class:`alignx.serve.expert.AxisExpert` calls; it takes
fully templated prompt strings and returns text. :class:`HFBackend` is the CPU/GPU
implementation with ``transformers.generate``: several requests are generated together
(left padding, one forward per step for the whole batch), each with its own ``max_tokens``
and stop strings; requests with different sampling settings (temperature/top_p) run as
separate sub-batches because ``generate`` takes one setting per call. A vLLM backend for GPU
is a later addition behind the same protocol; :class:`alignx.serve.npengine.NumpyBackend` is
the torch-free CPU engine of the expert replicas. torch is imported only by :class:`HFBackend`,
so the protocol, :class:`SamplingParams` and :func:`finish_completion` cost an expert replica
no torch runtime.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    Attributes:
        max_tokens: cap on new tokens.
        temperature: 0 means greedy decoding.
        top_p: nucleus sampling mass (ignored when greedy).
        stop: strings that end the completion; the returned text excludes them.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def group_key(self) -> tuple[float, float]:
        """Requests with equal keys can share one ``generate`` call."""
        return (0.0, 1.0) if self.greedy else (self.temperature, self.top_p)


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamState:
    """The final state of a streamed generation (filled when the stream ends)."""

    completion: Completion | None = None
    deltas: list[str] = field(default_factory=list)


class GenerationBackend(Protocol):
    """The engine seam: HF ``generate`` here, vLLM on GPU later."""

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens of a templated prompt."""
        ...

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Completion]:
        """Generate one completion per prompt (prompts already carry the chat template)."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str | Completion]:
        """Yield text deltas, then the final :class:`Completion`."""
        ...


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; return (text, whether a stop was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopHoldback:
    """Streaming with stop strings: text that could still become a stop string is held back
    until it is known not to be one, so a stop string never reaches the client.

    Args:
        stops: the request's stop strings.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the whole text generated so far; return the new text that is safe to send, and
        whether a stop string was found (then the stream is over)."""
        cut, found = _cut_at_stop(text, self.stops)
        safe = len(cut) if found else max(self.sent, len(text) - self.hold)
        delta = (cut if found else text)[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, found


def finish_completion(tok: Any, eos_ids: set[int], new_ids: list[int], prompt_len: int,
                      p: SamplingParams) -> Completion:
    """Turn one row's new tokens into a :class:`Completion` (EOS, stop strings, length).

    Shared by every engine, so they agree on text, finish reason and token counts.

    Args:
        tok: the tokenizer (``decode``).
        eos_ids: ids that end a generation.
        new_ids: the generated ids (may run past EOS or the limit: batch padding).
        prompt_len: tokens of the prompt (reported as ``prompt_tokens``).
        p: the request's settings.
    """
    ids = new_ids[: p.max_tokens]
    hit_eos = False
    for j, t in enumerate(ids):
        if t in eos_ids:
            ids, hit_eos = ids[:j], True
            break
    text = tok.decode(ids, skip_special_tokens=True)
    text, hit_stop = _cut_at_stop(text, p.stop)
    n = len(ids)
    if hit_stop:  # tokens consumed = shortest prefix whose text contains a stop string
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if _cut_at_stop(tok.decode(ids[:mid], skip_special_tokens=True), p.stop)[1]:
                hi = mid
            else:
                lo = mid + 1
        n = lo
    reason: FinishReason = "stop" if (hit_eos or hit_stop) else "length"
    return Completion(text, reason, prompt_len, n + (1 if hit_eos else 0))


class _RowStops:
    """A per-row stopping criterion: a row is done at its ``max_tokens`` or a stop string.

    transformers accepts a ``(B,)`` bool tensor from a stopping criterion and stops each
    row independently (finished rows are padded), so one batch mixes different limits.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, prompt_len: int,
                 params: Sequence[SamplingParams], cancel: threading.Event | None = None):
        self.tok, self.prompt_len, self.params, self.cancel = tok, prompt_len, params, cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, p in enumerate(self.params):
            if n_new >= p.max_tokens:
                done[i] = True
            elif p.stop:
                # Decode only the tail: a stop string spans at most a few tokens.
                tail = self.tok.decode(input_ids[i, max(self.prompt_len, input_ids.shape[1] - 16):],
                                       skip_special_tokens=True)
                done[i] = any(s in tail for s in p.stop)
        if self.cancel is not None and self.cancel.is_set():
            done[:] = True
        return done


class HFBackend:
    """``transformers`` generation on one model (CPU or GPU), batched with left padding.

    Args:
        model: a causal LM (a PEFT model with its adapter active, or a plain base model).
        tokenizer: its tokenizer; a pad token is set to EOS when missing.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tok = tokenizer
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else self.tok.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])

    def count_tokens(self, prompt: str) -> int:
        return len(self.tok(prompt, add_special_tokens=False)["input_ids"])

    def _gen_config(self, key: tuple[float, float], max_new: int):
        from transformers import GenerationConfig

        temperature, top_p = key
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else {
            "do_sample": False}
        return GenerationConfig(
            max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id,
            eos_token_id=sorted(self.eos_ids), **kw,
        )

    def _finish(self, new_ids: list[int], prompt_len: int, p: SamplingParams) -> Completion:
        return finish_completion(self.tok, self.eos_ids, new_ids, prompt_len, p)

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Completion]:
        """Generate completions for several prompts together.

        Args:
            prompts: templated prompt strings (special tokens included by the template).
            params: one :class:`SamplingParams` per prompt.

        Returns:
            One :class:`Completion` per prompt, in order.

        Raises:
            ValueError: ``prompts`` and ``params`` differ in length.
        """
        import torch

        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        with torch.inference_mode():
            return self._generate(prompts, params)

    def _generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(prompts)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.group_key(), []).append(i)
        for key, idx in groups.items():
            sub_params = [params[i] for i in idx]
            enc = self.tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                           padding_side="left", add_special_tokens=False).to(self.device)
            plen = enc["input_ids"].shape[1]
            lens = enc["attention_mask"].sum(1).tolist()
            max_new = max(p.max_tokens for p in sub_params)
            gen = self.model.generate(
                **enc, generation_config=self._gen_config(key, max_new),
                stopping_criteria=[_RowStops(self.tok, plen, sub_params)],
            )  # (B, plen + new)
            for row, i in enumerate(idx):
                out[i] = self._finish(gen[row, plen:].tolist(), int(lens[row]), params[i])
        return [c for c in out if c is not None]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str | Completion]:
        """Stream one generation: yields text deltas, then the final :class:`Completion`.

        Text that could be the start of a stop string is held back until it is known not to
        be one, so a stop string never reaches the client. Closing the iterator early stops
        the generation thread at its next step.
        """
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tok([prompt], return_tensors="pt", add_special_tokens=False).to(self.device)
        plen = enc["input_ids"].shape[1]
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        result: dict[str, object] = {}

        def _run() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(
                        **enc, generation_config=self._gen_config(params.group_key(), params.max_tokens),
                        stopping_criteria=[_RowStops(self.tok, plen, [params], cancel)],
                        streamer=streamer,
                    )
            except BaseException as e:  # surfaced to the consumer below
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=_run, name="alignx-stream", daemon=True)
        worker.start()
        held, text = StopHoldback(params.stop), ""
        try:
            for piece in streamer:
                text += piece
                delta, found = held.feed(text)
                if delta:
                    yield delta
                if found:
                    cancel.set()
                    break
        finally:
            cancel.set()
            worker.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        final = self._finish(result["ids"][0, plen:].tolist(), plen, params)  # type: ignore[index]
        if len(final.text) > held.sent:
            yield final.text[held.sent:]
        yield final
