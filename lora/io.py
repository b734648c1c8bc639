"""Saving and loading LoRA adapters in PEFT's format, and merged Hugging Face checkpoints.

Adapter directory (what ``peft.PeftModel.from_pretrained(base, dir)`` reads)::

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)

PEFT stores ``lora_A``/``lora_B`` as ``nn.Linear`` weights, which is exactly
our A (r, in) and B (out, r): no transposes.

Merged directory: an ordinary Hugging Face checkpoint (config.json,
generation_config.json, safetensors shards under the base model's own key
names, tokenizer files) for ``AutoModelForCausalLM.from_pretrained`` and vLLM.

Every file lands atomically: written under a temporary name in the target
directory and renamed into place (a merged checkpoint is built in a temporary
sibling directory and renamed as a whole).

Reading a merged checkpoint strictly (what the merge check compares):
``check_checkpoint_files`` (present, complete), ``compare_checkpoint`` (every
tensor bit-identical to a model in memory), ``load_checkpoint_strict``
(from_pretrained with no missing or unexpected key); each raises
``CheckpointError`` naming the file or tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from markerlab.errors import UserError
from markerlab.io import atomic_write_bytes, write_json

from .lora import LoRALinear, _target_matches, inject_lora, layer_index, lora_modules

logger = logging.getLogger("markerlab.lora")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps LoraModel wraps the HF model: its state-dict names carry this prefix.
PEFT_PREFIX = "base_model.model."


MERGED_WEIGHTS_NAME = "model.safetensors"
MERGED_INDEX_NAME = "model.safetensors.index.json"


class AdapterError(UserError, ValueError):
    """An adapter directory that cannot be loaded into this model (missing/unexpected key, bad shape, ...)."""


class CheckpointError(UserError):
    """A merged checkpoint that is incomplete, damaged, or not the model it should hold; the message names the file."""


def peft_key(module_name: str, which: str) -> str:
    """PEFT's saved name of A or B of the LoRA layer `module_name` (``which`` in {"A", "B"})."""
    return f"{PEFT_PREFIX}{module_name}.lora_{which}.weight"


def _uniform(values: list, what: str):
    if len(set(values)) != 1:
        raise ValueError(f"save_adapter: LoRA layers disagree on {what} ({sorted(set(values))}); PEFT's format needs one value")
    return values[0]


# ------------------------------------------------------------------- adapters


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    r: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Write `model`'s LoRA weights as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    r / alpha / dropout / target_modules default to what the injected layers
    say; when given they must agree with them (a config that lies about the
    weights would load wrongly in PEFT). The model may be merged or not: A and
    B are saved either way. Returns the directory.
    """
    layers = list(lora_modules(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    # The model's truth, checked against what the caller says.
    actual = {
        "r": _uniform([m.r for _, m in layers], "r"),
        "alpha": _uniform([m.alpha for _, m in layers], "alpha"),
        "dropout": _uniform([m.dropout for _, m in layers], "dropout"),
    }
    for key, given in (("r", r), ("alpha", alpha), ("dropout", dropout)):
        if given is not None and given != actual[key]:
            raise ValueError(f"save_adapter: {key}={given!r} but the model's LoRA layers have {key}={actual[key]!r}")
    names = [name for name, _ in layers]
    if target_modules is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name in names})
    else:
        targets = list(target_modules)
        stray = [n for n in names if not _target_matches(n, targets)]
        if stray:
            raise ValueError(f"save_adapter: LoRA layer {stray[0]} is not covered by target_modules={targets}")
    # Adapted decoder layers, when not all of them (PEFT's layers_to_transform).
    indices = sorted({layer_index(n) for n in names} - {None})
    all_layers = sorted({layer_index(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {None})
    transform = indices if indices and indices != all_layers else None
    # PEFT re-injects by target name on load: every matching nn.Linear must be one of ours.
    wrapped = {id(m.base) for _, m in layers}
    uncovered = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n
                 and id(m) not in wrapped and _target_matches(n, targets, transform)]
    if uncovered:
        raise ValueError(f"save_adapter: {uncovered[0]} matches target_modules={targets} but has no LoRA layer")

    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers:
        tensors[peft_key(name, "A")] = m.A.detach().to("cpu").contiguous()  # (r, in)
        tensors[peft_key(name, "B")] = m.B.detach().to("cpu").contiguous()  # (out, r)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": actual["r"],
        "lora_alpha": actual["alpha"],
        "lora_dropout": actual["dropout"],
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": transform,
        "layers_pattern": "layers" if transform else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None,
    }

    from safetensors.torch import save as safetensors_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory with a config has complete weights.
    atomic_write_bytes(out / ADAPTER_WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_json(out / ADAPTER_CONFIG_NAME, config)
    logger.info("saved LoRA adapter (%d layers, r=%d) to %s", len(layers), actual["r"], out)
    return out


# PEFT options this implementation does not have: loading an adapter that uses
# one would silently compute something else, so refuse.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json, checked for the LoRA variant this package implements."""
    d = Path(adapter_dir)
    path = d / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for key, ok in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in ok:
            raise AdapterError(f"{path}: {key}={cfg[key]!r} is not supported (expected {ok[0]!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise AdapterError(f"{path}: '{key}' is missing")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):  # PEFT allows one index
        cfg["layers_to_transform"] = layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)
                                   and cfg.get("layers_pattern") in (None, "layers", ["layers"])):
        raise AdapterError(f"{path}: layers_to_transform={layers!r} with layers_pattern="
                           f"{cfg.get('layers_pattern')!r} is not supported (expected a list of layer indices)")
    return cfg


@torch.no_grad()
def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Load a PEFT-format LoRA adapter (ours or one saved by PEFT) into `model`, in place.

    If the model has no LoRA layers yet, they are injected with the adapter's
    r / lora_alpha / lora_dropout / target_modules (LoRA dtype `dtype`). If it
    has, they must have the same r and alpha and must not be merged. Every key
    and shape is checked: a missing or unexpected key is an AdapterError that
    names it. Returns the adapter config.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    weights = d / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{weights}: file not found (only safetensors adapters are supported)")

    if not any(True for _ in lora_modules(model)):
        # A throwaway generator: the A's drawn here are overwritten below, and
        # loading must not advance the global RNG.
        inject_lora(
            model,
            r=int(cfg["r"]),
            alpha=cfg["lora_alpha"],
            dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
            target_modules=cfg["target_modules"],
            generator=torch.Generator().manual_seed(0),
            dtype=dtype,
            layers=cfg.get("layers_to_transform"),
        )
    layers = list(lora_modules(model))
    for name, m in layers:
        if m.merged:
            raise AdapterError(f"load_adapter: {name} is merged; unmerge before loading new weights")
        if m.r != cfg["r"] or m.alpha != cfg["lora_alpha"]:
            raise AdapterError(
                f"load_adapter: {name} has r={m.r}, alpha={m.alpha} but {d / ADAPTER_CONFIG_NAME} "
                f"says r={cfg['r']}, lora_alpha={cfg['lora_alpha']}"
            )

    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    expected = {peft_key(name, w): getattr(m, w) for name, m in layers for w in ("A", "B")}
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing:
        raise AdapterError(
            f"{weights}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " required by the model's LoRA layers"
        )
    if unexpected:
        raise AdapterError(
            f"{weights}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " matches no LoRA layer of the model"
        )
    for k, p in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{weights}: {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
    for k, p in expected.items():
        p.copy_(tensors[k])
    logger.info("loaded LoRA adapter from %s (%d layers, r=%d)", d, len(layers), cfg["r"])
    return cfg


# ------------------------------------------------------------------- merged checkpoints


def save_merged(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the LoRA-merged model as a full Hugging Face checkpoint (+ tokenizer files).

    The model is merged in place (float32 sum, one rounding to the base dtype),
    each LoRALinear is swapped back for its own ``nn.Linear`` -- so the
    weights carry their original names (``model.layers.0.self_attn.q_proj.weight``),
    tied weights are handled by transformers and nothing is copied -- and
    ``model.save_pretrained`` writes config.json, generation_config.json and
    safetensors shards (with model.safetensors.index.json when sharded). The
    LoRA layers are then put back.

    **The in-memory model is left merged** (its forward equals the saved
    checkpoint's); ``unmerge_all(model)`` restores the base weights to within
    one rounding of the base dtype.

    The checkpoint is built in a temporary sibling directory and renamed into
    place; an existing `out_dir` is an error unless `overwrite`.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged needs a transformers PreTrainedModel, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        layers = list(lora_modules(model))
        for _, m in layers:
            m.merge()
        _unwrap(model, layers)
        try:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finally:
            _rewrap(model, layers)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check_no_lora_keys(tmp)
        if out.exists():  # overwrite: move the old one aside first, so `out` is never half-written
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved merged checkpoint (%d LoRA layers merged) to %s", len(layers), out)
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's own names, LoRA A and B left out.

    For a merged model this is what `save_merged` writes (tied weights appear under
    every name that shares them; the checkpoint holds one). Tensors are the live
    parameters, not copies.
    """
    layers = list(lora_modules(model))
    _unwrap(model, layers)
    try:
        return dict(model.state_dict())
    finally:
        _rewrap(model, layers)


def _unwrap(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    """Put each LoRALinear's own base nn.Linear back at its place in the tree."""
    for name, m in layers:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)


def _rewrap(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    for name, m in layers:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m)


def _check_no_lora_keys(d: Path) -> None:
    """Guard: a merged checkpoint has weights, only base names, no LoRA tensors."""
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"save_merged: no safetensors file was written in {d}")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if "lora_" in k or k.endswith((".A", ".B")) or ".base." in k:
                    raise RuntimeError(f"save_merged: {f.name} contains LoRA key {k!r}")


# ------------------------------------------------------------------- reading merged checkpoints strictly
#
# The merge check (evaluate/merge.py) compares what is on disk with what is in memory;
# these are its readers. Each failure is a CheckpointError naming the file or tensor.


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def merged_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF checkpoint (one file, or every shard of the index), all present."""
    d = Path(model_dir)
    index = d / MERGED_INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' table)") from None
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{d / missing[0]}: weight file listed in {MERGED_INDEX_NAME} is missing"
                                  f"{_more(missing)}")
        return [d / f for f in files]
    if (d / MERGED_WEIGHTS_NAME).is_file():
        return [d / MERGED_WEIGHTS_NAME]
    others = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".safetensors"))
    raise CheckpointError(f"{d / MERGED_WEIGHTS_NAME}: missing -- {d} has config.json but no weights (expected "
                          f"{MERGED_WEIGHTS_NAME} or {MERGED_INDEX_NAME}"
                          + (f"; found only {', '.join(others)}" if others else "") + ")")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def check_checkpoint_files(model_dir: str | os.PathLike) -> dict:
    """config.json, weights and tokenizer present, and every weight file opens (safetensors checks its extent).

    Returns counts and, under "files", each weight file's size and sha256 (a fingerprint of the checkpoint).
    """
    from safetensors import SafetensorError, safe_open

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d / 'config.json'}: missing (not a Hugging Face checkpoint)")
    files, n = merged_weight_files(d), 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                n += len(list(sf.keys()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors file, truncated or damaged ({e})") from None
    if not any((d / p).is_file() for p in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"{d}: no tokenizer files (expected tokenizer.json / tokenizer_config.json)")
    return {"n_tensors": n, "n_files": len(files),
            "files": {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files}}


def compare_checkpoint(model_dir: str | os.PathLike, model: nn.Module) -> dict:
    """Every tensor on disk against `model`'s (see base_state_dict): name, dtype, shape, and value bit for bit.

    Tensors are read one at a time and compared on the model's device.
    """
    from safetensors import safe_open

    expected, bad, n = base_state_dict(model), [], 0
    for f in merged_weight_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name not in expected:
                    raise CheckpointError(f"{f}: unexpected tensor {name} (not a weight of the model; a LoRA key "
                                          f"left unmerged?)")
                want, got, n = expected[name], sf.get_tensor(name), n + 1
                if got.dtype != want.dtype:
                    raise CheckpointError(f"{f}: tensor {name} is {str(got.dtype)[6:]}, expected "
                                          f"{str(want.dtype)[6:]} (model.dtype)")
                if got.shape != want.shape:
                    raise CheckpointError(f"{f}: tensor {name} has shape {tuple(got.shape)}, the model's is "
                                          f"{tuple(want.shape)}")
                got = got.to(want.device)
                if not torch.equal(got, want):
                    zeros = " (it is all zeros)" if not bool(got.any()) and bool(want.any()) else ""
                    bad.append(f"{name}{zeros}, max |diff| {float((got.float() - want.float()).abs().max()):.3g}")
    if bad:
        raise CheckpointError(f"{model_dir}: {len(bad)} tensor(s) differ from the merged model in memory (a damaged "
                              f"file, or a merge of another adapter): " + "; ".join(bad[:3])
                              + (" ..." if len(bad) > 3 else ""))
    return {"n_compared": n}


def load_checkpoint_strict(model_dir: str | os.PathLike, dtype: str, device: str) -> nn.Module:
    """`from_pretrained` in `dtype` on `device` (eval mode); any missing, unexpected or mismatched key is an error.

    A missing key is what transformers would otherwise initialise at random, with a log line only.
    """
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                       output_loading_info=True)
    for kind, what in (("missing_keys", "is missing (it would be randomly initialised)"),
                       ("unexpected_keys", "is not part of the architecture"),
                       ("mismatched_keys", "has the wrong shape")):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise CheckpointError(f"{model_dir}: tensor {keys[0]} {what} when transformers loads it{_more(keys)}")
    if info.get("error_msgs"):
        raise CheckpointError(f"{model_dir}: transformers could not load the checkpoint: {info['error_msgs'][0]}")
    return model.to(device).eval()
