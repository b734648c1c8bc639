"""train.compile: torch.compile on each decoder layer, and what to say when it cannot.

    from trainer.compile import compile_layers, CompileFailed
    compile_layers(model)          # in place; parameter names and the adapter format do not change

Each layer is compiled with dynamic shapes (module.compile(), so the state dict
keeps its names). The attention call inside is left out of the graph on purpose
(trainer/attention.py): the documents' lengths must not become guards. A
compile failure (no C compiler for inductor, an unsupported op) is an error,
never a silent eager run: dynamo's suppress_errors stays off.
"""

from __future__ import annotations

import torch


class CompileFailed(RuntimeError):
    """torch.compile failed on the first step; the message says what to set."""


def decoder_layers(model) -> list:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers to compile")
    return list(layers)


def compile_layers(model, backend: str | None = None) -> int:
    """torch.compile each decoder layer in place; returns how many. `backend` None is inductor.

    The CPU tests pass backend="aot_eager" (graph capture and AOT autograd without
    code generation, seconds instead of minutes).
    """
    import torch._dynamo as dynamo

    # One graph serves every layer (parameters are graph inputs); leave room for a few
    # variants (train vs eval, the last micro-batch of an epoch).
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    kwargs = {"dynamic": True} if backend is None else {"dynamic": True, "backend": backend}
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)


def compile_error(e: BaseException) -> CompileFailed | None:
    """A CompileFailed naming the fix when `e` came out of dynamo/inductor, else None."""
    mod = type(e).__module__ or ""
    if mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(e).__name__:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CompileFailed(f"train.compile: torch.compile failed on the first step ({type(e).__name__}: "
                             f"{first[:200]}); set train.compile = false to train eagerly (same maths)")
    return None
