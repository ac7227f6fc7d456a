"""Serving: one copy of the frozen base weights per node, shared by every expert replica.

Three expert deployments that each load the base model hold three copies of the same frozen
weights. Instead, a detached actor per (node, model) owns one object-store copy of the base's
parameters and buffers as numpy arrays; each replica on that node ``ray.get``\\ s them
zero-copy (read-only views of the node's shared memory) and builds its model on the ``meta``
device with those arrays as parameters, so only the small LoRA adapter is private. The weights
are frozen and never written, which is what makes read-only views safe.

The store actor itself stays small: a one-shot task (:func:`load_base_arrays`, its own worker
process, which exits afterwards) loads the model with torch and returns the arrays, and the
actor keeps the reference. A task's return value is owned by its caller, so the arrays live as
long as the actor; the actor never imports torch or transformers and never maps the weights.

Two layouts, one store per (node, model, engine): ``torch`` keeps the parameters as the
``transformers`` model names them (:func:`build_on_arrays` rebuilds the torch model on them);
``numpy`` keeps :func:`alignx.serve.npengine.engine_arrays` (transposed Linear weights), which
the torch-free engine runs on directly (:func:`numpy_base_loader`).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignx.config import ModelCfg

log = logging.getLogger(__name__)

NAMESPACE = "alignx"

Engine = Literal["torch", "numpy"]


def _arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Parameters (tied ones once) and all buffers (persistent or not) as numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for name, p in model.named_parameters():  # remove_duplicate=True: tied weights once
        out[f"p:{name}"] = p.detach().cpu().numpy()
    for name, b in model.named_buffers():
        out[f"b:{name}"] = b.detach().cpu().numpy()
    return out


def release_heap(collect: bool = True) -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, in every thread's arena).

    Called after a one-time load (the store actor, an expert replica: the loading garbage of
    the tokenizer, config and adapter files is ~30 MB per process) and when an expert goes idle
    after generating (activations and KV cache of the last batch).

    Args:
        collect: run a full ``gc.collect()`` first (~0.1 s with torch and transformers loaded;
            worth it after loading, not after every batch).
    """
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def load_base_arrays(model_cfg: dict[str, Any], engine: Engine = "torch"
                     ) -> tuple[dict[str, np.ndarray], int]:
    """Load the base model and return its weights as numpy arrays (run as a one-shot task).

    Args:
        model_cfg: the ``model`` section as a dict.
        engine: the layout: ``torch`` (:func:`_arrays` of the ``transformers`` model) or
            ``numpy`` (:func:`alignx.serve.npengine.engine_arrays`, read without torch).

    Returns:
        ``(arrays, nbytes)``: the arrays and their total size.
    """
    from alignx.config import ModelCfg
    from alignx.modeling import load_base, resolve_model_dir

    if engine == "numpy":
        from alignx.serve.npengine import load_engine_arrays

        arrays = load_engine_arrays(resolve_model_dir(model_cfg["name"]))[1]
    else:
        model, _ = load_base(ModelCfg(**model_cfg), use_gpu=False)
        arrays = _arrays(model)
    return arrays, int(sum(a.nbytes for a in arrays.values()))


class BaseWeightsStore:
    """Owns the object-store copy of one base model's weights (a detached Ray actor).

    The weights are loaded by a one-shot task on this node (:func:`load_base_arrays`, in a
    worker process that exits when it is done); its return value is owned by this actor, so
    it lives as long as the actor does. The actor imports neither torch nor transformers.

    Args:
        model_cfg: the ``model`` section as a dict.
        engine: the layout of the arrays (see :func:`load_base_arrays`).
    """

    def __init__(self, model_cfg: dict[str, Any], engine: Engine = "torch"):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        load = ray.remote(num_returns=2, max_calls=1, num_cpus=0, max_retries=1)(
            load_base_arrays).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        self.ref, nbytes = load.remote(model_cfg, engine)
        self.nbytes = int(ray.get(nbytes))
        log.info("base weights of %s in the object store (%.1f MB)", model_cfg["name"],
                 self.nbytes / 2**20)

    def get(self) -> list[Any]:
        """The reference, wrapped in a list so Ray passes the reference, not the value."""
        return [self.ref]

    def size(self) -> int:
        return self.nbytes


def _store_name(model_cfg: ModelCfg, node_id: str, engine: Engine = "torch") -> str:
    layout = "-np" if engine == "numpy" else ""
    return (f"alignx-base-{model_cfg.name.replace('/', '_')}-{model_cfg.dtype}{layout}-"
            f"{node_id[:12]}")


def shared_arrays(model_cfg: ModelCfg, engine: Engine = "torch") -> dict[str, np.ndarray]:
    """This node's object-store copy of the base weights in ``engine``'s layout (zero-copy,
    read-only views). Call inside a Ray worker; the first caller on a node creates the store
    actor (``get_if_exists`` makes concurrent creation safe)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    store = ray.remote(BaseWeightsStore).options(
        name=_store_name(model_cfg, node, engine), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(model_cfg.model_dump(), engine)
    return ray.get(ray.get(store.get.remote())[0])


def numpy_base_loader(model_cfg: ModelCfg, shared: bool = True):  # noqa: ANN201 - a BaseLoader
    """A ``BaseLoader`` for the torch-free engine: a :class:`~alignx.serve.npengine.NumpyCausalLM`
    on this node's shared weights (``shared``, inside a Ray worker) or on a private copy read
    from the checkpoint, and the tokenizer.

    Raises (when called):
        UnsupportedModelError: the engine cannot run this model (the caller may fall back).
    """

    def load() -> tuple[Any, PreTrainedTokenizerBase]:
        from alignx.modeling import load_tokenizer, resolve_model_dir
        from alignx.serve.npengine import NumpyCausalLM, load_engine_arrays, read_arch

        path = resolve_model_dir(model_cfg.name)
        cfg, eos = read_arch(path)
        arrays = shared_arrays(model_cfg, "numpy") if shared else load_engine_arrays(path)[1]
        return NumpyCausalLM(cfg, arrays, eos_ids=eos), load_tokenizer(model_cfg)

    load.engine = "numpy"  # type: ignore[attr-defined] - read by load_system
    return load


def shared_base_loader(model_cfg: ModelCfg, engine: Engine = "torch"):  # noqa: ANN201
    """A ``BaseLoader`` that builds the base model on this node's shared weights.

    Call inside a Ray worker (a Serve replica). The first replica on a node creates the
    store actor (``get_if_exists`` makes concurrent creation safe).

    Args:
        model_cfg: the base model section.
        engine: ``torch`` (a ``transformers`` model) or ``numpy`` (:func:`numpy_base_loader`).

    Returns:
        ``() -> (model, tokenizer)``.
    """
    if engine == "numpy":
        return numpy_base_loader(model_cfg, shared=True)

    def load() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from alignx.modeling import load_tokenizer

        arrays = shared_arrays(model_cfg, "torch")  # zero-copy numpy views
        return build_on_arrays(model_cfg, arrays), load_tokenizer(model_cfg)

    return load


def build_on_arrays(model_cfg: ModelCfg, arrays: dict[str, np.ndarray]) -> PreTrainedModel:
    """Build the model skeleton on ``meta`` and make ``arrays`` its parameters and buffers.

    Args:
        model_cfg: the base model section (for the architecture config).
        arrays: ``{"p:<param>" | "b:<buffer>": array}`` as written by :class:`BaseWeightsStore`.

    Returns:
        The frozen model in eval mode; its tensors share memory with ``arrays``.

    Raises:
        RuntimeError: a parameter or buffer was left on ``meta`` (architecture mismatch).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignx.modeling import resolve_dtype, resolve_model_dir

    path = resolve_model_dir(model_cfg.name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(model_cfg.dtype, False),
            trust_remote_code=model_cfg.trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "array is not writable": these weights are frozen
        for key, arr in arrays.items():
            kind, name = key.split(":", 1)
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            t = torch.from_numpy(arr)
            if kind == "p":
                mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[attr] = t
    model.tie_weights()
    for mod in model.modules():  # rotary embeddings keep an un-registered copy of inv_freq
        if isinstance(getattr(mod, "original_inv_freq", None), torch.Tensor) and hasattr(
                mod, "inv_freq"):
            mod.original_inv_freq = mod.inv_freq
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"shared weights did not cover {left[:5]} ({len(left)} tensors)")
    model.requires_grad_(False)
    model.eval()
    return model
