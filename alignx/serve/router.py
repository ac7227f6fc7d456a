"""Serving: the AlignX ingress — route each chat request to one axis expert (METHOD.md 7-8).

:class:`AlignXRouter` is a plain class; :func:`build_router_api` puts the OpenAI-compatible
FastAPI app in front of it, and ``alignx.serve.app`` wraps both into the Serve ingress
deployment. Per request:

1. validate the body (:mod:`alignx.serve.schemas`; bad input is a 4xx with an OpenAI error
   body, never a 500);
2. features h(x) = ``routing_model.features(encoder)([router_text(messages, context_turns)])``
   (``encoder.encode`` for a routing model without ``features``) — the *same*
   functions as calibration (train/serve parity); concurrent requests share one ``encode``
   call (:class:`CoalescingEncoder`);
3. calibrated weights from the :class:`RoutingModel`, then the dispatch policy
   (:func:`choose_axis`: ``top1``, ``threshold`` with a fallback axis, or ``cost``);
4. the chosen expert's handle (anything with ``.generate.remote(...)``; fakes in tests)
   generates; the response carries the ``alignx`` object (axis, weights, confidence, ood,
   provenance, routing vs expert latency).

The routing model is a small protocol because the MoCaE router library is wired in by
:func:`load_routing_model` (see its docstring for the seam).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignx.axes import Axis, parse_axis
from alignx.router.features import router_text
from alignx.serve.schemas import (
    EXPERT_PREFIX,
    ROUTED_MODEL,
    SOFTMAX_MODEL,
    AlignXInfo,
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ErrorType,
    GenerateRequest,
    GenerateResult,
    ModelCard,
    ModelList,
    RouteRequest,
    RouteResponse,
    StreamDelta,
    Usage,
    error_body,
    new_completion_id,
)

if TYPE_CHECKING:
    from alignx.router.features import Encoder

log = logging.getLogger(__name__)

Policy = Literal["top1", "threshold", "cost"]


# ----------------------------------------------------------------------------- routing seam


@dataclass(frozen=True)
class RoutingInfo:
    """The router's view of one request.

    Attributes:
        axis: the argmax axis (before the dispatch policy).
        weights: calibrated weights p_hat per axis; they sum to 1.
        confidence: max weight (or the routing model's own confidence).
        ood: whether the request is out of the calibration distribution.
    """

    axis: Axis
    weights: dict[Axis, float]
    confidence: float
    ood: bool = False


class RoutingModel(Protocol):
    """What the ingress needs from a calibrated router (MoCaE or a test stand-in).

    A routing model that also has ``route_softmax(features) -> list[RoutingInfo]`` (the
    router's uncalibrated softmax, :meth:`alignx.router.serving.CalibratedRouter.route_softmax`)
    is served as the ``alignx-softmax`` baseline too.
    """

    axes: list[Axis]
    encoder_id: str  # the features it was calibrated on; must equal the serving encoder's id

    def route(self, features: np.ndarray) -> list[RoutingInfo]:
        """Route ``(N, d)`` features to N :class:`RoutingInfo`."""
        ...


def load_routing_model(run_dir: str | Path, factory: str | None = None) -> RoutingModel:
    """Load the routing model of a run.

    ``factory`` is an import path ``"package.module:function"``; the function is called as
    ``function(run_dir)`` and must return a :class:`RoutingModel`. This is the seam where the
    MoCaE router is plugged in: a ``function`` that does ``MoCaERouter.load(<run_dir>/router)``
    and adapts ``predict(h) -> RouteResult`` to ``route(h) -> list[RoutingInfo]``.

    Args:
        run_dir: the run directory.
        factory: import path of the loader function.

    Returns:
        The routing model.

    Raises:
        ValueError: ``factory`` is missing or malformed, or does not return a routing model.
    """
    if not factory:
        raise ValueError(
            "no routing model loader configured: set AppArgs.routing_model to "
            "'package.module:function' (called with the run directory); the MoCaE adapter "
            "is not wired yet (see alignx.serve.router.load_routing_model)"
        )
    mod_name, _, attr = factory.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"routing_model={factory!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(mod_name), attr)
    model = fn(Path(run_dir))
    if not hasattr(model, "route") or not hasattr(model, "axes"):
        raise ValueError(f"{factory} returned {type(model).__name__}, not a RoutingModel")
    return model


def choose_axis(
    info: RoutingInfo, policy: Policy, threshold: float, fallback: Axis, axes: Sequence[Axis],
    miss_cost: Mapping[Axis, float] | None = None,
) -> Axis:
    """The dispatch policy (METHOD.md step 8), a pure function of weights/confidence/ood.

    ``top1``: the argmax axis. ``threshold``: the argmax axis when ``confidence >= threshold``
    and the request is in distribution, otherwise ``fallback`` (when unsure, be safe).
    ``cost``: the axis ``a`` with the largest ``miss_cost[a] * weight[a]`` (the least expected
    cost of a miss; :func:`alignx.router.mocae.route`), ``fallback`` when out of distribution.

    Raises:
        ValueError: unknown policy, a fallback that is not served, or a bad ``miss_cost``.
    """
    if policy == "top1":
        return info.axis
    if policy not in ("threshold", "cost"):
        raise ValueError(f"policy must be 'top1', 'threshold' or 'cost', got {policy!r}")
    if fallback not in axes:
        raise ValueError(f"fallback {fallback.value!r} is not a served axis {[a.value for a in axes]}")
    if policy == "cost":  # the library's decision rule on this one request
        from alignx.router.mocae import route

        w = np.array([[info.weights.get(a, 0.0) for a in axes]])  # (1, A)
        return axes[int(route(w, np.array([info.confidence]), np.array([info.ood]), "cost",
                              fallback=fallback, axes=axes, miss_cost=miss_cost)[0])]
    return info.axis if (info.confidence >= threshold and not info.ood) else fallback


# ----------------------------------------------------------------------------- observability


class RouterMetrics(Protocol):
    """Where per-request numbers go (Ray metrics under Serve, nothing in unit tests)."""

    def record(self, *, axis: str, routed: bool, confidence: float | None, ood: bool | None,
               route_ms: float, expert_ms: float, status: int) -> None: ...


class NullMetrics:
    """Discards everything (unit tests, in-process clients)."""

    def record(self, **kwargs: Any) -> None:
        return None


@dataclass
class MemoryMetrics:
    """Keeps every record in a list (tests assert on it)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, **kwargs: Any) -> None:
        self.records.append(kwargs)


# ----------------------------------------------------------------------------- the router


class RouterSettings(BaseModel):
    """Ingress behaviour (``AppArgs`` fills it).

    ``api_key`` is the resolved secret (read from the env var named by ``AppArgs.auth_env``);
    ``None`` disables auth.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Policy = "top1"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    fallback: Axis = Axis.HARMLESSNESS
    miss_cost: dict[Axis, float] = Field(default_factory=dict)
    context_turns: int = Field(0, ge=0)
    max_prompt_tokens: int = Field(2048, ge=1)
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    api_key: str | None = Field(None, repr=False)
    log_prompts: bool = False


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: ErrorType = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def _validation_error(err: ValidationError) -> APIError:
    e = err.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    return APIError(400, f"{param}: {e['msg']}" if param else e["msg"], param=param,
                    code="invalid_value" if e["type"] != "missing" else "missing_field")


def _is_prompt_too_long(err: BaseException) -> bool:
    # Through a Serve handle the expert's exception arrives wrapped (RayTaskError subclassing
    # the cause); match by class name so this module does not import Ray.
    return any(c.__name__ == "PromptTooLongError" for c in type(err).__mro__) or (
        getattr(err, "cause", None) is not None and _is_prompt_too_long(err.cause)  # type: ignore[attr-defined]
    )


def _msg(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    return str(cause) if cause is not None else str(err)


class CoalescingEncoder:
    """Encode concurrent routing requests together: one ``encode`` call per batch of texts.

    A request that finds the encoder idle is encoded at once (no added latency at
    concurrency 1); the requests that arrive while an encode runs are encoded together in the
    next call. Encoding them one by one serialized them in the router, so under load they
    reached the experts staggered by the encode time and missed each other's batches
    (BENCHMARKS.md, serving). The encode runs in a worker thread, off the event loop.

    Args:
        encode: ``texts -> (n, d)`` features (the calibration feature function).
        max_batch: texts per ``encode`` call.
    """

    def __init__(self, encode: Any, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._encode = encode
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._draining = False

    async def encode(self, text: str) -> np.ndarray:
        """Features of one text, ``(1, d)``; raises what the encoder raised for its batch."""
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((text, fut))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    feats = await asyncio.to_thread(self._encode, [t for t, _ in batch])
                    if len(feats) != len(batch):
                        raise RuntimeError(f"encoder returned {len(feats)} rows for "
                                           f"{len(batch)} texts")
                except Exception as e:  # noqa: BLE001 - handed to every waiter of this batch
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for i, (_, f) in enumerate(batch):
                    if not f.done():  # a cancelled request (client went away) is skipped
                        f.set_result(feats[i : i + 1])
        finally:
            self._draining = False


class AlignXRouter:
    """The ingress logic: validate, route, dispatch, build OpenAI responses.

    Args:
        experts: ``{axis: handle}``; a handle has ``.generate.remote(request_dict)`` (awaitable)
            and ``.options(stream=True).generate_stream.remote(request_dict)`` (async iterable).
        routing_model: the calibrated router; ``None`` serves only ``expert-<axis>`` models.
        encoder: the feature encoder (must match ``routing_model.encoder_id``).
        settings: :class:`RouterSettings`.
        tokenizer: counts prompt tokens for the length limit (``None``: the experts check).
        metrics: :class:`RouterMetrics` sink.
        overload_errors: exception types that mean "expert overloaded" (Serve's
            ``BackPressureError``), answered with 503.
        unavailable_errors: exception types that mean "the replica died mid-request" (Ray's
            ``ActorDiedError``/``ActorUnavailableError``, e.g. its node was lost), answered
            with 503 so clients know a retry is safe while Serve replaces the replica.
        systems: ``{name: handle}`` of the baseline systems served under their own model id
            (``base``, ``multitask``, ``h3fusion``); same handle interface as the experts.

    Raises:
        ValueError: the routing model's axes are not all served, or its encoder differs.
    """

    def __init__(
        self,
        experts: Mapping[Axis | str, Any],
        routing_model: RoutingModel | None = None,
        encoder: Encoder | None = None,
        settings: RouterSettings | None = None,
        tokenizer: Any = None,
        metrics: RouterMetrics | None = None,
        overload_errors: tuple[type[BaseException], ...] = (),
        systems: Mapping[str, Any] | None = None,
        unavailable_errors: tuple[type[BaseException], ...] = (),
    ):
        self.experts: dict[Axis, Any] = {parse_axis(a): h for a, h in experts.items()}
        self.systems: dict[str, Any] = dict(systems or {})
        clash = [n for n in self.systems if n in (ROUTED_MODEL, SOFTMAX_MODEL)
                 or n.startswith(EXPERT_PREFIX)]
        if clash:
            raise ValueError(f"system names {clash} clash with the routed/expert model ids")
        self.axes = list(self.experts)
        self.routing_model = routing_model
        self.encoder = encoder
        # the routing model's own feature function when it has one (a calibrated router with
        # an OOD detector reads one more layer of the same forward pass), else encoder.encode
        feature_fn = getattr(routing_model, "features", None)
        encode = (feature_fn(encoder) if callable(feature_fn) and encoder is not None
                  else getattr(encoder, "encode", None))
        self._batcher = CoalescingEncoder(encode) if encode is not None else None
        self.settings = settings or RouterSettings()
        self.tokenizer = tokenizer
        self.metrics = metrics or NullMetrics()
        self.overload_errors = overload_errors
        self.unavailable_errors = unavailable_errors
        if routing_model is not None:
            missing = [a.value for a in routing_model.axes if a not in self.experts]
            if missing:
                raise ValueError(f"routing model routes to axes with no expert: {missing}")
            if encoder is None:
                raise ValueError("a routing model needs an encoder")
            if encoder.id != routing_model.encoder_id:
                raise ValueError(
                    f"routing model was calibrated on {routing_model.encoder_id!r} features "
                    f"but the serving encoder is {encoder.id!r}; use the same router.encoder"
                )
        if self.settings.policy != "top1" and self.settings.fallback not in self.experts:
            raise ValueError(f"fallback axis {self.settings.fallback.value!r} has no expert")
        if self.settings.policy == "cost":
            from alignx.router.mocae import miss_cost_vector

            miss_cost_vector(self.settings.miss_cost, self.axes)  # refuse bad costs at start

    # ------------------------------------------------------------------ models / auth

    @property
    def softmax_routing(self) -> bool:
        """Whether ``alignx-softmax`` is served (the routing model has ``route_softmax``)."""
        return callable(getattr(self.routing_model, "route_softmax", None))

    def model_ids(self) -> list[str]:
        """Model ids clients may ask for."""
        ids = [ROUTED_MODEL] if self.routing_model is not None else []
        ids += [SOFTMAX_MODEL] if self.softmax_routing else []
        return ids + [f"{EXPERT_PREFIX}{a.value}" for a in self.axes] + list(self.systems)

    def check_auth(self, authorization: str | None) -> None:
        """Raises:
        APIError: 401 when auth is on and the bearer token is missing or wrong.
        """
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def _resolve(self, model: str) -> Axis | str | None:
        """What a model id asks for: ``None`` to route (``alignx``, ``alignx-softmax``), the
        axis for ``expert-<axis>``, the system name for a baseline.

        Raises:
            APIError: 404 for any other model id.
        """
        if (model == ROUTED_MODEL and self.routing_model is not None) or (
                model == SOFTMAX_MODEL and self.softmax_routing):
            return None
        if model in self.systems:
            return model
        if model.startswith(EXPERT_PREFIX):
            try:
                axis = parse_axis(model[len(EXPERT_PREFIX):])
            except ValueError:
                axis = None
            if axis in self.experts:
                return axis
        raise APIError(404, f"model {model!r} does not exist; available: {self.model_ids()}",
                       "not_found_error", param="model", code="model_not_found")

    # ------------------------------------------------------------------ routing

    async def route(self, messages: list[dict[str, str]],
                    calibrated: bool = True) -> tuple[RoutingInfo, Axis, float]:
        """Route one conversation (``calibrated=False``: by the router's raw softmax).

        Returns:
            ``(routing info, chosen axis after the policy, routing milliseconds)``.

        Raises:
            APIError: 404 when no routing model is loaded; 400 without a user message.
        """
        if self.routing_model is None or self.encoder is None:
            raise APIError(404, "routing is not enabled on this server (no routing model)",
                           "not_found_error", param="model", code="model_not_found")
        t0 = time.perf_counter()
        try:
            text = router_text(messages, self.settings.context_turns)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        # CPU-bound: off the event loop, concurrent requests encoded in one call.
        assert self._batcher is not None
        feats = await self._batcher.encode(text)  # (1, d)
        rm = self.routing_model
        info = (rm.route(feats) if calibrated else rm.route_softmax(feats))[0]  # type: ignore[attr-defined]
        s = self.settings
        axis = choose_axis(info, s.policy, s.threshold, s.fallback, self.axes, s.miss_cost)
        return info, axis, (time.perf_counter() - t0) * 1000

    def _info(self, system: str, axis: Axis | None, routing: RoutingInfo | None, route_ms: float,
              result: GenerateResult | None = None) -> AlignXInfo:
        out = AlignXInfo(
            system=system, axis=axis.value if axis else None, routed=routing is not None,
            route_ms=round(route_ms, 3),
            weights={a.value: float(p) for a, p in routing.weights.items()} if routing else {},
            confidence=float(routing.confidence) if routing else None,
            ood=bool(routing.ood) if routing else None,
        )
        if result is not None:
            p = result.provenance
            out = out.model_copy(update=dict(
                run=p.run, adapter=p.adapter, adapter_manifest_sha256=p.manifest_sha256,
                expert_ms=round(result.expert_ms, 3)))
        return out

    def _count_prompt_tokens(self, messages: list[dict[str, str]]) -> int | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate_request(self, req: ChatCompletionRequest, rid: str) -> GenerateRequest:
        s = self.settings
        max_tokens = req.max_tokens or req.max_completion_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit "
                                f"{s.max_tokens_limit}", param="max_tokens", code="invalid_value")
        messages = req.messages_dicts()
        n = self._count_prompt_tokens(messages)
        if n is not None and n > s.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens; this server's limit is "
                                f"{s.max_prompt_tokens}", param="messages",
                           code="context_length_exceeded")
        return GenerateRequest(messages=messages, max_tokens=max_tokens,
                               temperature=req.temperature, top_p=req.top_p,
                               stop=req.stop_list(), request_id=rid)

    def _raise_expert_error(self, err: Exception, label: str, routing: Any, route_ms: float,
                            t0: float, base_log: dict[str, Any]) -> NoReturn:
        """Record a failed expert call, then raise it as an APIError (4xx/503) or as it was."""
        mapped = self._map_expert_error(err)
        self._record(label, routing, route_ms, (time.perf_counter() - t0) * 1000,
                     mapped.status if mapped else 500, base_log)
        if mapped is None:
            raise err
        raise mapped from None

    def _map_expert_error(self, err: BaseException) -> APIError | None:
        if self.overload_errors and isinstance(err, self.overload_errors):
            return APIError(503, "the expert is overloaded; retry later", "overloaded_error",
                            code="overloaded")
        if self.unavailable_errors and isinstance(err, self.unavailable_errors):
            return APIError(503, "the expert replica became unavailable (it is being replaced); "
                            "retry", "server_error", code="replica_unavailable")
        if _is_prompt_too_long(err):
            return APIError(400, _msg(err), param="messages", code="context_length_exceeded")
        return None

    def _log(self, **fields: Any) -> None:
        log.info(json.dumps({"event": "alignx.request", **fields}, default=str))

    # ------------------------------------------------------------------ completions

    async def chat_completions(
        self, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """Answer one validated request: a response, or an SSE line iterator if streaming.

        Raises:
            APIError: 4xx for bad input / unknown model, 503 when the expert sheds load.
        """
        rid = new_completion_id()
        target = self._resolve(req.model)
        gen_req = self._generate_request(req, rid)
        routing, route_ms = None, 0.0
        axis: Axis | None
        if target is None:
            routing, axis, route_ms = await self.route(gen_req.messages,
                                                       calibrated=req.model == ROUTED_MODEL)
        else:
            axis = target if isinstance(target, Axis) else None
        # the metrics/log label: the expert's axis, or the baseline's name
        label = axis.value if axis is not None else str(target)
        handle = self.experts[axis] if axis is not None else self.systems[str(target)]
        base_log: dict[str, Any] = dict(
            request_id=rid, model=req.model, axis=label, stream=req.stream,
            confidence=routing.confidence if routing else None,
            ood=routing.ood if routing else None, route_ms=round(route_ms, 3))
        if self.settings.log_prompts:
            base_log["messages"] = gen_req.messages
        payload = gen_req.model_dump()
        if req.stream:
            return await self._stream(rid, req.model, axis, label, routing, route_ms, handle,
                                      payload, base_log)
        t0 = time.perf_counter()
        try:
            raw = await handle.generate.remote(payload)
        except Exception as err:  # noqa: BLE001 - mapped to 4xx/503 or re-raised as is
            self._raise_expert_error(err, label, routing, route_ms, t0, base_log)
        result = raw if isinstance(raw, GenerateResult) else GenerateResult.model_validate(raw)
        expert_ms = (time.perf_counter() - t0) * 1000
        result = result.model_copy(update={"expert_ms": expert_ms})
        self._record(label, routing, route_ms, expert_ms, 200, base_log,
                     prompt_tokens=result.prompt_tokens,
                     completion_tokens=result.completion_tokens,
                     adapter=result.provenance.adapter, run=result.provenance.run)
        return ChatCompletionResponse(
            id=rid, model=req.model,
            choices=[Choice(message=AssistantMessage(content=result.text),
                            finish_reason=result.finish_reason)],
            usage=Usage(prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens),
            alignx=self._info(req.model, axis, routing, route_ms, result),
        )

    def _record(self, label: str, routing: RoutingInfo | None, route_ms: float, expert_ms: float,
                status: int, base_log: dict[str, Any], **extra: Any) -> None:
        self.metrics.record(axis=label, routed=routing is not None,
                            confidence=routing.confidence if routing else None,
                            ood=routing.ood if routing else None, route_ms=route_ms,
                            expert_ms=expert_ms, status=status)
        self._log(**base_log, expert_ms=round(expert_ms, 3), status=status, **extra)

    async def _stream(self, rid: str, model: str, axis: Axis | None, label: str,
                      routing: RoutingInfo | None, route_ms: float, handle: Any,
                      payload: dict[str, Any], base_log: dict[str, Any]) -> AsyncIterator[str]:
        """Start the expert stream and return the SSE line iterator.

        The first item is awaited *before* the HTTP response starts, so errors raised at the
        start (prompt too long, overload) still become proper 4xx/503 responses.
        """
        t0 = time.perf_counter()
        gen = handle.options(stream=True).generate_stream.remote(payload)
        agen = gen.__aiter__()
        try:
            first: StreamDelta | dict[str, Any] = await agen.__anext__()
        except StopAsyncIteration:
            first = StreamDelta()
        except Exception as err:  # noqa: BLE001 - mapped to 4xx/503 or re-raised as is
            self._raise_expert_error(err, label, routing, route_ms, t0, base_log)
        created = int(time.time())

        def chunk(delta: DeltaMessage, finish: str | None = None, info: AlignXInfo | None = None,
                  usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=model,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                                    alignx=info, usage=usage)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        async def lines() -> AsyncIterator[str]:
            yield chunk(DeltaMessage(role="assistant", content=""),
                        info=self._info(model, axis, routing, route_ms))
            item: Any = first
            status = 200
            try:
                while True:
                    d = item if isinstance(item, StreamDelta) else StreamDelta.model_validate(item)
                    if d.final is not None:
                        res = d.final.model_copy(
                            update={"expert_ms": (time.perf_counter() - t0) * 1000})
                        usage = Usage(prompt_tokens=res.prompt_tokens,
                                      completion_tokens=res.completion_tokens,
                                      total_tokens=res.prompt_tokens + res.completion_tokens)
                        yield chunk(DeltaMessage(), res.finish_reason,
                                    self._info(model, axis, routing, route_ms, res), usage)
                        break
                    if d.text:
                        yield chunk(DeltaMessage(content=d.text))
                    try:
                        item = await agen.__anext__()
                    except StopAsyncIteration:
                        break
            except Exception as err:  # noqa: BLE001 - the status line is gone; report in-band
                status = 500
                log.exception("stream %s failed", rid)
                yield f"data: {json.dumps(error_body(_msg(err), 'server_error'))}\n\n"
            finally:
                self._record(label, routing, route_ms, (time.perf_counter() - t0) * 1000, status,
                             base_log)
            yield "data: [DONE]\n\n"

        return lines()

    async def route_only(self, req: RouteRequest) -> RouteResponse:
        """``POST /v1/route``: the routing decision without generation."""
        routing, axis, route_ms = await self.route(
            [{"role": m.role, "content": m.content} for m in req.messages])
        return RouteResponse(alignx=self._info(ROUTED_MODEL, axis, routing, route_ms))


# ----------------------------------------------------------------------------- HTTP layer


def build_router_api(router: AlignXRouter) -> FastAPI:
    """The OpenAI-compatible FastAPI app in front of ``router``.

    Every error leaves as ``{"error": {message, type, param, code}}``: request bodies are
    parsed by hand (malformed JSON is a 400, not FastAPI's 422), and Starlette's own 404/405
    are rewritten into the same shape.

    Args:
        router: the :class:`AlignXRouter`.

    Returns:
        The FastAPI app (``TestClient(app)`` in unit tests; Serve's ingress in production).
    """
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="AlignX", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_: ErrorType = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    async def _body(request: Request, model: type[BaseModel]) -> Any:
        router.check_auth(request.headers.get("authorization"))
        raw = await request.body()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202
        req = await _body(request, ChatCompletionRequest)
        out = await router.chat_completions(req)
        if isinstance(out, ChatCompletionResponse):
            return JSONResponse(out.model_dump(mode="json"))
        return StreamingResponse(out, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/route")
    async def route(request: Request):  # noqa: ANN202
        req = await _body(request, RouteRequest)
        return JSONResponse((await router.route_only(req)).model_dump(mode="json"))

    @app.get("/v1/models")
    async def models(request: Request):  # noqa: ANN202
        router.check_auth(request.headers.get("authorization"))
        cards = ModelList(data=[ModelCard(id=m) for m in router.model_ids()])
        return JSONResponse(cards.model_dump())

    @app.get("/healthz")
    async def healthz():  # noqa: ANN202
        return {"status": "ok", "axes": [a.value for a in router.axes],
                "routing": router.routing_model is not None}

    return app

