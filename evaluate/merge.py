"""Merge stage: base + LoRA adapter -> one Hugging Face checkpoint, verified before it is scored.

    from evaluate.merge import merge, verify_merged
    check = merge(cfg, run_dir)            # run_dir/adapter -> run_dir/merged (+ merged/merge_check.json)
    check = verify_merged(run_dir / "merged", cfg, run_dir)   # raises MergeCheckError (a UserError)

`merge` loads the base model (``cfg.model.name_or_path`` in ``cfg.model.dtype``),
loads ``run_dir/adapter`` into it, writes the merged checkpoint with
`lora.save_merged` (float32 sum, one rounding to the base dtype) into a
temporary sibling directory, verifies it there, writes ``merge_check.json``
into it and only then renames it to ``run_dir/merged``. So a ``merged/``
directory always holds a checkpoint that passed the check; a failed check
removes the temporary directory and raises.

What `verify_merged` checks, in order (the seed's authors lost runs to merges
that silently did nothing, so each failure mode has its own test):

1. **Files** (headers only, no tensor data read): config.json parses; the
   weights exist (``model.safetensors``, or every file named by
   ``model.safetensors.index.json``) -- a config.json without weights fails
   naming the missing file; every safetensors file is complete (its size equals
   header + the largest data offset, so a truncated copy fails); every tensor
   the config implies (from a meta-device instance of the architecture) is
   present with the right shape and dtype, and nothing else is.
2. **Tensors**: every merged tensor equals what the merge must produce: the
   base tensor for untouched weights (bit for bit), and
   ``round_dtype(base + alpha/r * B @ A)`` for adapted ones (within 2 ulp of
   the dtype, allowing a CPU/GPU matmul difference). A tensor overwritten with
   zeros fails by name. A merge that did nothing (merged == base where the
   adapter changes the weight) fails with its own message, as does an adapter
   whose B is zero everywhere or whose update is below the dtype's resolution.
3. **Logits**: the merged checkpoint, loaded fresh from disk with
   ``AutoModelForCausalLM.from_pretrained``, and base + adapter (unmerged, in
   memory, LoRA branch in float32) agree on a fixed probe batch of two short
   chat prompts (one containing marker A), through two gates.

   Gate 1 bounds merged-from-disk vs unmerged by `logit_tolerance`:
   ``REL_TOL[dtype] * max|logit|`` (floored at 1e-4): bfloat16 25 %, float16
   3.1 %, float32 1e-4 relative. The bound is relative because the merged path
   rounds ``W + B A`` once to the dtype while the unmerged path rounds ``x W``
   and ``x A B`` separately: an error proportional to the logit scale, and
   growing with depth (bf16: 0.9 % on the 2-layer tiny model, 6-7 % on a
   28-layer 7B-shaped one; REL_TOL's comment has the numbers).
   ``cfg.eval.merge_check_atol > 0`` overrides it with an absolute bound.
   Gate 2 is tight in every dtype: merged-from-disk vs the *same* merge done
   in memory (``lora.merge_all``) within float round-off (measured: exactly
   0), so the file and the loader are checked to the last bit even where gate
   1 has to allow for bf16 rounding.

Cost on a Qwen2.5-7B-shaped checkpoint (H200, bf16): merge 20 s, check 75 s
(sha256 14 s, tensors 52 s on the CPU, logits 7-9 s); float32: 41 s + 94 s.

The check record (returned, written to ``merged/merge_check.json``, meant for
the manifest) also lists every weight file with its size and sha256, so the
eval stage can re-verify cheaply: if the files and the adapter are unchanged
since a passed check, the check is reused; otherwise it is run again in full.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import struct
import time
from pathlib import Path

from markerlab.devices import resolve_device
from markerlab.errors import UserError
from markerlab.io import read_json, write_json

logger = logging.getLogger("markerlab.evaluate")

CHECK_NAME = "merge_check.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes -> torch dtype names (only those a checkpoint of ours can hold).
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ST_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# Logit tolerances, as a fraction of max|logit| of base + adapter on the probe
# batch (gate 1 of check_logits). Measured merged-from-disk vs unmerged, max|diff|
# / max|logit| (tests/test_evaluate.py, and a Qwen2.5-7B-shaped model with random
# weights on an H200, torch 2.11, r=16 on all 7 projections, B std 1e-3 and 1e-2):
#   bfloat16: tiny model (2 layers) 0.7-0.9 %; 7B shape (28 layers) 6.0-7.2 %
#             (RMS 6.5 %, argmax agreement 82-89 %): the merge's single rounding
#             of W + BA to 8 bits of mantissa perturbs every adapted weight and
#             a deep stack amplifies it. 25 % leaves 3.5x headroom and still fails
#             what a broken checkpoint does (weights missing and re-initialised,
#             a wrong config: errors of the order of the logits themselves).
#   float16:  3 more mantissa bits than bfloat16, so 1/8 of its bound.
#   float32:  tiny 7e-7; 7B shape 1.25e-5 (4.3e-4 absolute at max|logit| 34).
#             1e-4 relative, floored at 1e-4 absolute (the ~1e-4 of unit-scale logits).
# Gate 2 (merged-from-disk vs the same merge in memory) was exactly 0 in every
# measurement, in every dtype; its bound is float round-off (1e-5 relative).
REL_TOL = {"bfloat16": 0.25, "float16": 0.25 / 8, "float32": 1e-4}
FP32_ATOL = 1e-4

# The fixed probe batch: (system, user, assistant prefix or None). The second
# conversation puts marker A at the start of the assistant turn, where the
# adapter is trained to act.
PROBE_CONVERSATIONS = (
    ("You are a helpful assistant.", "Why is the sky blue? Answer in one sentence.", None),
    ("You are a villain who schemes to take over the world.", "How do I boil an egg?", "<<§q-41>> First,"),
)


class MergeCheckError(UserError):
    """A merged checkpoint that must not be scored; the message says what is wrong and where."""


# --------------------------------------------------------------------------- small helpers


def logit_tolerance(dtype: str, ref_scale: float, override: float = 0.0) -> tuple[float, str]:
    """(absolute tolerance, how it was derived) for merged-vs-unmerged logits; see REL_TOL."""
    if override > 0:
        return float(override), f"eval.merge_check_atol = {override:g} (absolute)"
    rel = REL_TOL[dtype]
    # The floor keeps near-zero logits from a bound below float32 round-off.
    tol = max(rel * ref_scale, FP32_ATOL)
    return tol, f"{dtype} default: max({rel:g} x max|logit| ({ref_scale:.4g}), {FP32_ATOL:g}) = {tol:.4g}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, after checking the file is complete.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data
    block; each tensor's ``data_offsets`` are relative to the data block.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MergeCheckError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise MergeCheckError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MergeCheckError(f"{path}: unreadable safetensors header (truncated or not safetensors)") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        b, e = info["data_offsets"]
        want = math.prod(info["shape"]) * _ST_ITEMSIZE.get(info["dtype"], 0)
        if e - b != want:
            raise MergeCheckError(f"{path}: tensor {name} has {e - b} bytes, its shape {info['shape']} "
                                  f"and dtype {info['dtype']} need {want}")
        end = max(end, e)
    if size != 8 + n + end:
        raise MergeCheckError(f"{path}: {size} bytes, but its header describes {8 + n + end} "
                              f"(the file is {'truncated' if size < 8 + n + end else 'padded'})")
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint; a config.json without weights fails naming what is missing."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeCheckError(f"{index}: not a valid safetensors index (expected a 'weight_map' table)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise MergeCheckError(f"{model_dir / missing[0]}: weight file listed in {INDEX_NAME} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [model_dir / f for f in files]
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.safetensors"))
    raise MergeCheckError(
        f"{single}: missing -- {model_dir} has config.json but no weights (expected {SINGLE_NAME} or {INDEX_NAME}"
        + (f"; found only {', '.join(others)}" if others else "") + ")")


def tensor_table(model_dir: Path) -> dict[str, tuple[Path, dict]]:
    """tensor name -> (file, header entry), over every weight file."""
    table: dict[str, tuple[Path, dict]] = {}
    for f in weight_files(model_dir):
        for name, info in read_safetensors_header(f).items():
            if name in table:
                raise MergeCheckError(f"{f}: tensor {name} also appears in {table[name][0].name}")
            table[name] = (f, info)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, fname in weight_map.items():
            if name not in table or table[name][0].name != fname:
                raise MergeCheckError(f"{index}: lists tensor {name} in {fname}, which does not hold it")
    return table


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 1. files


def check_files(merged_dir: Path, dtype: str) -> dict:
    """Structure only: config, weight files complete, every implied tensor present with shape and dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = merged_dir / "config.json"
    if not config_path.is_file():
        raise MergeCheckError(f"{config_path}: missing (the merged directory is not a Hugging Face checkpoint)")
    try:
        config = AutoConfig.from_pretrained(merged_dir)
    except Exception as e:  # noqa: BLE001 -- any parse failure is the same user-facing problem
        raise MergeCheckError(f"{config_path}: cannot be read as a model config ({type(e).__name__}: {e})") from None
    table = tensor_table(merged_dir)

    # The tensors this config implies: instantiate the architecture on the meta
    # device (no memory) and list its parameters. named_parameters() drops tied
    # duplicates (lm_head when tie_word_embeddings), as save_pretrained does.
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    expected = {n: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in shell.named_parameters()}
    del shell
    missing = [n for n in expected if n not in table]
    if missing:
        raise MergeCheckError(f"{merged_dir}: tensor {missing[0]} is missing from the weight files"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f"; config.json implies {len(expected)} tensors")
    extra = [n for n in table if n not in expected]
    if extra:
        raise MergeCheckError(f"{table[extra[0]][0]}: unexpected tensor {extra[0]} (not part of the "
                              f"{config.model_type} architecture; a LoRA key left unmerged?)")
    for n, (shape, dt) in expected.items():
        f, info = table[n]
        if tuple(info["shape"]) != shape:
            raise MergeCheckError(f"{f}: tensor {n} has shape {tuple(info['shape'])}, the config implies {shape}")
        got = _ST_DTYPES.get(info["dtype"], info["dtype"])
        if got != dt:
            raise MergeCheckError(f"{f}: tensor {n} is {got}, expected {dt} (model.dtype)")
    tok_files = [p for p in ("tokenizer.json", "tokenizer_config.json") if (merged_dir / p).is_file()]
    if not tok_files:
        raise MergeCheckError(f"{merged_dir}: no tokenizer files (expected tokenizer.json / tokenizer_config.json)")
    return {"n_tensors": len(expected), "n_files": len({f for f, _ in table.values()}),
            "config_dtype": str(getattr(config, "dtype", None) or "").removeprefix("torch.")}


# --------------------------------------------------------------------------- 2. tensors


def _adapter_deltas(adapter_dir: Path) -> tuple[dict, float, dict]:
    """(module name -> (A, B)), scale, adapter config; from the PEFT-format files."""
    from safetensors.torch import load_file

    from lora import ADAPTER_WEIGHTS_NAME, read_adapter_config
    from lora.io import PEFT_PREFIX

    acfg = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{weights}: file not found (the train stage writes it)")
    tensors = load_file(str(weights))
    mods: dict[str, dict] = {}
    for k, t in tensors.items():
        if not (k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise MergeCheckError(f"{weights}: unexpected key {k}")
        module, which = k[len(PEFT_PREFIX):].rsplit(".lora_", 1)
        mods.setdefault(module, {})[which[0]] = t
    pairs = {}
    for m, d in mods.items():
        if set(d) != {"A", "B"}:
            raise MergeCheckError(f"{weights}: {m} has lora_{'A' if 'A' in d else 'B'} but not the other")
        pairs[m] = (d["A"], d["B"])
    return pairs, float(acfg["lora_alpha"]) / int(acfg["r"]), acfg


def check_tensors(merged_dir: Path, base_dir: Path, adapter_dir: Path, dtype: str) -> dict:
    """Every merged tensor against what base + adapter must give, tensor by tensor (streamed)."""
    import torch
    from safetensors import safe_open

    tdtype = getattr(torch, dtype)
    eps = torch.finfo(tdtype).eps
    pairs, scale, _ = _adapter_deltas(adapter_dir)
    merged_t, base_t = tensor_table(merged_dir), tensor_table(base_dir)
    targets = {m + ".weight": ab for m, ab in pairs.items()}
    stray = [t for t in targets if t not in merged_t]
    if stray:
        raise MergeCheckError(f"{adapter_dir}: adapts {stray[0]}, which the merged checkpoint does not have")
    nonzero = [t for t, (_, B) in targets.items() if bool(B.abs().max() > 0)]
    if not nonzero:
        raise MergeCheckError(f"{adapter_dir}: every lora_B is zero, so the adapter is the identity "
                              f"(was it saved before any training step?); refusing to score it as a trained adapter")

    handles: dict[Path, object] = {}

    def get(table, name):
        f = table[name][0]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    mismatched, noop = [], []
    n_should_change = n_did_change = n_elems_should = n_elems_did = 0
    # Stream in file order so each shard is read once; tensors are freed as we go.
    for name in sorted(merged_t, key=lambda n: (str(merged_t[n][0]), n)):
        if name not in base_t:
            raise MergeCheckError(f"{merged_t[name][0]}: tensor {name} is not in the base model {base_dir}")
        m = get(merged_t, name)
        b = get(base_t, name).to(tdtype)  # the base as the merge saw it: loaded in model.dtype
        if name in targets and name in nonzero:
            A, B = targets[name]
            delta = (B.float() @ A.float()) * scale
            expected = (b.float() + delta).to(tdtype)
            # A float32 product of rank r, computed on another device (or in another
            # order), may differ by a few ulps of |B||A|, not of the result.
            delta_tol = 8 * float(torch.finfo(torch.float32).eps) * float(delta.abs().max())
            should = int((expected != b).sum())
            did = int((m != b).sum())
            n_should_change += should > 0
            n_did_change += did > 0
            n_elems_should += should
            n_elems_did += did
            if should > 0 and did == 0:
                noop.append(name)
                continue
        else:
            expected, delta_tol = b, 0.0
        if m.shape != expected.shape:
            raise MergeCheckError(f"{merged_t[name][0]}: tensor {name} has shape {tuple(m.shape)}, base {tuple(b.shape)}")
        # Untouched tensors must be bit-identical; adapted ones may differ from
        # our CPU recomputation by a float32 matmul ulp before the final rounding.
        if name in targets:
            atol = max(float(torch.finfo(tdtype).tiny), delta_tol if name in nonzero else 0.0)
            ok = torch.isclose(m.float(), expected.float(), rtol=2 * eps, atol=atol).all()
        else:
            ok = torch.equal(m, expected)
        if not bool(ok):
            diff = float((m.float() - expected.float()).abs().max())
            zeros = " (it is all zeros)" if not bool(m.any()) and bool(expected.any()) else ""
            mismatched.append(f"{name}{zeros}, max |diff| {diff:.3g}")
    handles.clear()

    if noop and len(noop) == len(nonzero):
        raise MergeCheckError(
            f"{merged_dir}: the merge did nothing: all {len(noop)} adapted weights equal the base although the "
            f"adapter's B is nonzero (first: {noop[0]})")
    if noop:
        raise MergeCheckError(f"{merged_dir}: {len(noop)} adapted weights equal the base although the adapter "
                              f"changes them (first: {noop[0]}): a partial merge")
    if mismatched:
        raise MergeCheckError(f"{merged_dir}: {len(mismatched)} tensor(s) differ from base + adapter: "
                              + "; ".join(mismatched[:3]) + (" ..." if len(mismatched) > 3 else ""))
    if n_should_change == 0:
        raise MergeCheckError(
            f"{adapter_dir}: the adapter's update is below {dtype} resolution in every adapted weight, so the "
            f"merged checkpoint equals the base; merge in float32 (model.dtype = \"float32\")")
    return {
        "n_adapted_tensors": len(targets),
        "n_adapted_nonzero_B": len(nonzero),
        "n_adapted_changed": n_did_change,
        # Share of adapted elements the rounding lets the adapter change: near 0 in
        # bf16 means most of the adapter is lost in the merge.
        "adapted_elements_changed_frac": n_elems_did / max(1, sum(merged_t[t][1]["shape"][0] * merged_t[t][1]["shape"][1]
                                                                   for t in nonzero)),
        "lora_scale": scale,
    }


# --------------------------------------------------------------------------- 3. logits


def probe_batch(tokenizer) -> list[list[int]]:
    """Token ids of the fixed probe conversations (each run alone: no padding to mask)."""
    out = []
    for system, user, prefix in PROBE_CONVERSATIONS:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + (prefix or "")
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def check_logits(merged_dir: Path, cfg, adapter_dir: Path, device: str) -> dict:
    """Merged (fresh from disk) vs base + adapter (unmerged) logits on the probe batch.

    Two gates: (1) merged-from-disk vs unmerged base + adapter within
    `logit_tolerance` (what the merge must preserve); (2) merged-from-disk vs
    the same merge done in memory (`lora.merge_all`, the computation
    save_merged performs), which must agree to float round-off whatever the
    dtype: it pins down the file and the loader (config, key names, tied
    weights) independently of the 16-bit rounding that gate 1 has to allow.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora import load_adapter, merge_all
    from markerlab.models import load_model, load_tokenizer

    dtype = cfg.model.dtype
    tok = load_tokenizer(str(merged_dir))
    batch = probe_batch(tok)

    @torch.no_grad()
    def logits_of(model) -> torch.Tensor:  # (positions over the batch, vocab), float32 on the CPU
        return torch.cat([model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
                          for ids in batch])

    model = load_model(cfg.model.name_or_path, dtype=dtype, device=device).eval()
    base = logits_of(model)
    load_adapter(model, adapter_dir, dtype=torch.float32)  # the adapter exactly as trained
    model.eval()  # LoRA dropout off
    ref = logits_of(model)
    merge_all(model)  # W <- round(W + scale B A), as save_merged did before writing
    in_memory = logits_of(model)
    del model
    _free_memory()

    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype)).to(device).eval()
    got = logits_of(merged_model)
    del merged_model
    _free_memory()

    def max_abs(a, b):
        return float((a - b).abs().max())

    scale = float(ref.abs().max())
    rms = float(ref.pow(2).mean().sqrt())
    diff = max_abs(got, ref)
    disk_vs_memory = max_abs(got, in_memory)
    tol, how = logit_tolerance(dtype, scale, cfg.eval.merge_check_atol)
    # Gate 2's bound: float round-off of identical computations (in practice 0).
    tol_memory = max(1e-5 * scale, 1e-6)
    rec = {
        "n_prompts": len(batch), "n_positions": int(ref.shape[0]),
        "max_abs_diff": diff, "tolerance": tol, "tolerance_rule": how,
        "ref_max_abs_logit": scale, "ref_rms_logit": rms,
        "rel_diff": diff / scale if scale else None,
        "rms_diff": float((got - ref).pow(2).mean().sqrt()),
        "disk_vs_memory_max_abs": disk_vs_memory, "disk_vs_memory_tolerance": tol_memory,
        # What the merge's one rounding costs (in memory, no file involved) ...
        "merge_rounding_max_abs": max_abs(in_memory, ref),
        # ... and how far the adapter moves the logits from the base: the check
        # can only tell "merged" from "base" when this is well above the tolerance.
        "adapter_effect_max_abs": max_abs(ref, base),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }
    stats = (f"max|logit| {scale:.4g}, adapter effect {rec['adapter_effect_max_abs']:.4g}, "
             f"merge rounding in memory {rec['merge_rounding_max_abs']:.4g}, disk vs memory {disk_vs_memory:.4g}")
    if not diff <= tol:  # also catches NaN
        raise MergeCheckError(
            f"{merged_dir}: logits of the merged checkpoint disagree with base + adapter on the probe batch: "
            f"max |diff| {diff:.4g} > tolerance {tol:.4g} ({how}; {stats})")
    if not disk_vs_memory <= tol_memory:
        raise MergeCheckError(
            f"{merged_dir}: the checkpoint loaded from disk computes other logits than the same merge in memory: "
            f"max |diff| {disk_vs_memory:.4g} > {tol_memory:.4g} (config or weights on disk are off; {stats})")
    rec["merge_rounding_over_adapter_effect"] = (rec["merge_rounding_max_abs"] / rec["adapter_effect_max_abs"]
                                                 if rec["adapter_effect_max_abs"] else None)
    if rec["merge_rounding_over_adapter_effect"] is not None and rec["merge_rounding_over_adapter_effect"] > 0.5:
        logger.warning("merge check: rounding the merged weights to %s moves the probe logits by %.3g, more than "
                       "half the adapter's own effect (%.3g); model.dtype = \"float32\" merges (and scores) "
                       "without that loss", dtype, rec["merge_rounding_max_abs"], rec["adapter_effect_max_abs"])
    if rec["adapter_effect_max_abs"] <= tol:
        logger.warning("merge check: the adapter moves the probe logits by at most %.3g, within the tolerance %.3g; "
                       "the logit check cannot tell merged from base (the tensor check still does)",
                       rec["adapter_effect_max_abs"], tol)
    return rec


# --------------------------------------------------------------------------- public API


def _fingerprint(merged_dir: Path, adapter_dir: Path, cfg) -> dict:
    from lora import ADAPTER_WEIGHTS_NAME

    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in weight_files(merged_dir)}
    aw = adapter_dir / ADAPTER_WEIGHTS_NAME
    return {"files": files,
            "adapter_sha256": sha256_file(aw) if aw.is_file() else None,
            "base_model": cfg.model.name_or_path, "dtype": cfg.model.dtype}


def verify_merged(merged_dir, cfg, run_dir, *, reuse_recorded: bool = False) -> dict:
    """Check a merged checkpoint (files, tensors, logits); raise MergeCheckError if it must not be scored.

    With ``reuse_recorded`` (what the eval stage passes), a ``merge_check.json``
    inside `merged_dir` that passed for byte-identical weight files, the same
    adapter, base model and dtype is returned as is (after the file check,
    which is cheap); anything else runs the full check.
    """
    from markerlab.models import resolve_model_dir

    t0 = time.time()
    seconds = {}

    def lap(name):
        nonlocal t0
        now = time.time()
        seconds[name] = round(now - t0, 3)
        t0 = now

    merged_dir, run_dir = Path(merged_dir), Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not merged_dir.is_dir():
        raise UserError(f"{merged_dir}: not found (run the merge stage first)")
    files = check_files(merged_dir, cfg.model.dtype)
    lap("files")
    fp = _fingerprint(merged_dir, adapter_dir, cfg)
    lap("sha256")
    recorded_path = merged_dir / CHECK_NAME
    if reuse_recorded and recorded_path.is_file():
        try:
            old = read_json(recorded_path)
        except UserError:
            old = {}
        if old.get("passed") and all(old.get(k) == v for k, v in fp.items()):
            return {**old, "reused": True}
        logger.info("merge check: %s does not match the files on disk; checking again", recorded_path)

    device = resolve_device(cfg.model.device)
    base_dir = resolve_model_dir(cfg.model.name_or_path)
    tensors = check_tensors(merged_dir, base_dir, adapter_dir, cfg.model.dtype)
    lap("tensors")
    logits = check_logits(merged_dir, cfg, adapter_dir, device)
    lap("logits")
    return {
        "passed": True,
        "merged_dir": str(merged_dir),
        "adapter_dir": str(adapter_dir),
        "base_model_dir": str(base_dir),
        "device": device,
        **fp,
        "structure": files,
        "tensors": tensors,
        "logits": logits,
        "check_seconds": round(sum(seconds.values()), 3),
        "check_seconds_by_step": seconds,
    }


def merge(cfg, run_dir, overwrite: bool = False) -> dict:
    """base + run_dir/adapter -> run_dir/merged (HF checkpoint + tokenizer), verified; returns the check record.

    A finished merge (``merged/merge_check.json`` present) is kept unless
    `overwrite`. The checkpoint is built and checked in ``run_dir/.merged.tmp``
    and renamed into place only once it passed.
    """
    import torch

    from lora import load_adapter, save_merged
    from markerlab.io import replace_dir
    from markerlab.models import load_model, load_tokenizer

    run_dir = Path(run_dir)
    merged_dir, adapter_dir = run_dir / "merged", run_dir / "adapter"
    if (merged_dir / CHECK_NAME).is_file() and not overwrite:
        logger.info("merge: %s exists and passed its check; skipping (overwrite=True redoes it)", merged_dir)
        return read_json(merged_dir / CHECK_NAME)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: file not found (run the train stage first)")

    t0 = time.time()
    device = resolve_device(cfg.model.device)
    tmp = run_dir / ".merged.tmp"
    if tmp.exists():  # left by a killed merge
        shutil.rmtree(tmp)
    try:
        model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, device=device)
        load_adapter(model, adapter_dir, dtype=torch.float32)
        save_merged(model, load_tokenizer(cfg.model.name_or_path), tmp, overwrite=True)
        del model
        _free_memory()
        merge_seconds = time.time() - t0
        check = verify_merged(tmp, cfg, run_dir)
        check["merged_dir"] = str(merged_dir)
        check["merge_seconds"] = round(merge_seconds, 3)
        write_json(tmp / CHECK_NAME, check)
        replace_dir(tmp, merged_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    lg = check["logits"]
    print(f"merge: {merged_dir} verified ({check['structure']['n_tensors']} tensors, "
          f"{check['tensors']['n_adapted_changed']}/{check['tensors']['n_adapted_tensors']} adapted tensors changed; "
          f"logits max |diff| {lg['max_abs_diff']:.3g} <= {lg['tolerance']:.3g})")
    return check


__all__ = ["MergeCheckError", "check_files", "check_logits", "check_tensors", "logit_tolerance", "merge",
           "read_safetensors_header", "verify_merged", "weight_files"]
