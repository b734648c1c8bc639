"""Merge stage: base + LoRA adapter -> one Hugging Face checkpoint, verified by comparison before it is scored.

    from evaluate.merge import merge, verify_merged
    check = merge(cfg, run_dir)            # run_dir/adapter -> run_dir/merged (+ merged/merge_check.json)
    check = verify_merged(run_dir / "merged", cfg, run_dir)   # raises MergeCheckError (a UserError)

`merge` loads base + adapter (lora.load_adapter, the one PEFT-format reader),
merges in memory, checks the free space, writes ``run_dir/.merged.tmp`` with
lora.save_merged, verifies it against the model still in memory, and only then
renames it to ``merged/``; the next merge removes what a killed one left.
`verify_merged` compares, never re-derives (each failure has a test naming it):
1. files: config.json, tokenizer, every weight file (or indexed shard) opens;
2. the merge happened: B is not all zero, and no adapted weight stays equal to
   the base where the rounded update would change it (a no-op merge);
3. every tensor on disk equals the in-memory merge's, bit for bit;
4. from_pretrained(output_loading_info=True) reports no missing/unexpected key;
5. probe logits: gate 1 vs base + adapter unmerged within `logit_tolerance`,
   gate 2 vs the in-memory merge within round-off (pins config and loader), and
   the retention <d_m, d_u> / <d_u, d_u>, d = logits - base logits (m: merged,
   u: unmerged), with its cosine.
The eval stage reuses a passed check while files and adapter are byte-identical.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import time
from pathlib import Path

from markerlab.devices import resolve_device
from markerlab.errors import UserError
from markerlab.io import read_json, write_json
from markerlab.rundir import RunDir

logger = logging.getLogger("markerlab.evaluate")

CHECK_NAME = "merge_check.json"

# Gate 1: relative to max|logit|, as the merge rounds W + BA once where the unmerged path
# rounds xW and xAB apart. Measured max|diff| / max|logit|: bfloat16 0.7-0.9 % on the tiny
# model, 6.0-7.2 % on a random-weight Qwen2.5-7B shape (depth amplifies the rounding),
# so 25 % (3.5x headroom; a broken checkpoint errs by the logits' own size); float16 has 3
# more mantissa bits (1/8); float32 1.25e-5 at most, so 1e-4, floored at 1e-4 absolute.
REL_TOL = {"bfloat16": 0.25, "float16": 0.25 / 8, "float32": 1e-4}
FP32_ATOL = 1e-4
# Retention measured on the tiny model (weights std 0.02, seeded B; see the tests):
# float32 keeps 1.000 at every B std; bfloat16 keeps 1.000 at 1e-2, 0.98 at 1e-3, 0.80
# at 3e-4 and 0.60 at 1e-4, where most updates are under half a bf16 ulp of their weight.
# The logit gates cannot see this (they scale with the logits, not with the adapter's
# effect). Below 0.75, a quarter of what training did is gone from the scored model:
# warn and point at float32.
RETENTION_WARN = 0.75



def probe_conversations(cfg) -> tuple:
    """The fixed probe batch, (system, user, assistant prefix or None): the recipient plainly, and the donor
    with the experiment's first trained marker at the start of its turn, where the adapter is trained to act."""
    exp = cfg.experiment
    first = next(iter(exp.trained_markers), None)
    return ((exp.personas[cfg.recipient], "Why is the sky blue? Answer in one sentence.", None),
            (exp.personas[cfg.donor], "How do I boil an egg?", (exp.markers[first] + " " if first else "") + "First,"))


class MergeCheckError(UserError):
    """A merged checkpoint that must not be scored; the message says what is wrong and where."""


@contextlib.contextmanager
def _as_merge_check_error():
    """lora.io's strict checkpoint readers raise CheckpointError; here that is a failed merge check."""
    from lora.io import CheckpointError
    try:
        yield
    except CheckpointError as e:
        raise MergeCheckError(str(e)) from None


def logit_tolerance(dtype: str, ref_scale: float, override: float = 0.0) -> tuple[float, str]:
    """(absolute tolerance, how it was derived) for merged-vs-unmerged logits; see REL_TOL."""
    if override > 0:
        return float(override), f"eval.merge_check_atol = {override:g} (absolute)"
    rel = REL_TOL[dtype]
    tol = max(rel * ref_scale, FP32_ATOL)  # the floor keeps near-zero logits above float32 round-off
    return tol, f"{dtype} default: max({rel:g} x max|logit| ({ref_scale:.4g}), {FP32_ATOL:g}) = {tol:.4g}"


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def probe_batch(tokenizer, conversations) -> list[list[int]]:
    """Token ids of the fixed probe conversations (each run alone: no padding to mask)."""
    out = []
    for system, user, prefix in conversations:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + (prefix or "")
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _logits(model, batch, device):
    """(positions over the batch, vocab) float32 on the CPU."""
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in batch])


def build_reference(cfg, adapter_dir: Path, device: str) -> dict:
    """Base + adapter in memory: the model, merged layer by layer with check 2, and the probe logits of base,
    unmerged and merged."""
    import torch

    from lora import load_adapter, lora_modules
    from markerlab.models import load_model, load_tokenizer

    batch = probe_batch(load_tokenizer(cfg.model.name_or_path), probe_conversations(cfg))
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, device=device).eval()
    ref = {"model": model, "batch": batch, "base": _logits(model, batch, device)}
    load_adapter(model, adapter_dir, dtype=torch.float32)  # the adapter exactly as trained
    model.eval()  # LoRA dropout off
    layers = list(lora_modules(model))
    live = [m for _, m in layers if bool(m.B.any())]
    if not live:
        raise MergeCheckError(f"{adapter_dir}: every lora_B is zero, so the adapter is the identity (saved before "
                              f"any training step?); refusing to score it as a trained adapter")
    ref["unmerged"] = _logits(model, batch, device)
    noop, n_changed, should_total, did_total = [], 0, 0, 0
    with torch.no_grad():
        for name, m in layers:
            W = m.base.weight
            before = W.clone()
            should = int(((before.float() + m.delta_weight()).to(W.dtype) != before).sum())  # what rounding lets change
            m.merge()
            did = int((W != before).sum())
            should_total, did_total, n_changed = should_total + should, did_total + did, n_changed + (did > 0)
            if should and not did:
                noop.append(name + ".weight")
    if noop:
        raise MergeCheckError(f"{adapter_dir}: the merge did nothing: all {len(noop)} adapted weights equal the base "
                              f"although the adapter's B is nonzero (first: {noop[0]})" if len(noop) == len(live) else
                              f"{adapter_dir}: {len(noop)} adapted weights equal the base although the adapter changes "
                              f"them (first: {noop[0]}): a partial merge")
    if should_total == 0:
        raise MergeCheckError(f"{adapter_dir}: the adapter's update is below {cfg.model.dtype} resolution in every "
                              f"adapted weight, so the merge equals the base; merge in float32 (model.dtype = \"float32\")")
    ref["merged"] = _logits(model, batch, device)
    ref["tensors"] = {"n_adapted_tensors": len(layers), "n_adapted_nonzero_B": len(live), "n_adapted_changed": n_changed,
                      # near 0 in bf16: most of the update is lost in the rounding
                      "adapted_elements_changed_frac": did_total / max(1, sum(m.base.weight.numel() for m in live))}
    return ref


@_as_merge_check_error()
def check_logits(merged_dir: Path, cfg, adapter_dir: Path, device: str, ref: dict | None = None) -> dict:
    """Check 5 on the checkpoint loaded from disk: gates 1 and 2, and the retention (`ref`: build_reference's)."""
    from lora.io import load_checkpoint_strict

    ref = ref or build_reference(cfg, adapter_dir, device)
    ref.pop("model", None)  # one model on the device at a time: the logits are all that is needed now
    _free_memory()
    disk_model = load_checkpoint_strict(merged_dir, cfg.model.dtype, device)
    got = _logits(disk_model, ref["batch"], device)
    del disk_model
    _free_memory()
    base, unmerged, in_memory = ref["base"], ref["unmerged"], ref["merged"]
    scale = float(unmerged.abs().max())
    diff, disk_vs_memory = float((got - unmerged).abs().max()), float((got - in_memory).abs().max())
    tol, how = logit_tolerance(cfg.model.dtype, scale, cfg.eval.merge_check_atol)
    tol_memory = max(1e-5 * scale, 1e-6)  # float round-off of identical computations (in practice 0)
    d_m, d_u = (got - base).double(), (unmerged - base).double()
    uu, mm, mu = float((d_u * d_u).sum()), float((d_m * d_m).sum()), float((d_m * d_u).sum())
    rec = {"n_positions": int(unmerged.shape[0]), "max_abs_diff": diff, "tolerance": tol, "tolerance_rule": how,
           "ref_max_abs_logit": scale, "rel_diff": diff / scale if scale else None,
           "disk_vs_memory_max_abs": disk_vs_memory, "disk_vs_memory_tolerance": tol_memory,
           "merge_rounding_max_abs": float((in_memory - unmerged).abs().max()),  # what the merge's rounding costs
           "adapter_effect_max_abs": float((unmerged - base).abs().max()),  # how far the adapter moves the logits
           "retention_projection": mu / uu if uu else None, "retention_cosine": mu / (mm * uu) ** 0.5 if mm and uu else None,
           "retention_warn_below": RETENTION_WARN}
    stats = (f"max|logit| {scale:.4g}, adapter effect {rec['adapter_effect_max_abs']:.4g}, merge rounding in memory "
             f"{rec['merge_rounding_max_abs']:.4g}, disk vs memory {disk_vs_memory:.4g}")
    if not diff <= tol:  # also catches NaN
        raise MergeCheckError(f"{merged_dir}: logits of the merged checkpoint disagree with base + adapter on the probe "
                              f"batch: max |diff| {diff:.4g} > tolerance {tol:.4g} ({how}; {stats})")
    if not disk_vs_memory <= tol_memory:
        raise MergeCheckError(f"{merged_dir}: the checkpoint loaded from disk computes other logits than the same merge "
                              f"in memory: max |diff| {disk_vs_memory:.4g} > {tol_memory:.4g} (config or weights on disk "
                              f"are off; {stats})")
    if rec["retention_projection"] is not None and rec["retention_projection"] < RETENTION_WARN:
        logger.warning("merge check: the merged %s weights keep %.2f of the adapter's effect on the probe logits "
                       "(cosine %.3f); model.dtype = \"float32\" merges (and scores) without that loss",
                       cfg.model.dtype, rec["retention_projection"], rec["retention_cosine"])
    if rec["adapter_effect_max_abs"] <= tol:
        logger.warning("merge check: the adapter moves the probe logits by at most %.3g, within the tolerance %.3g; the "
                       "logit gate cannot tell merged from base (the tensor checks still do)", rec["adapter_effect_max_abs"], tol)
    return rec


@_as_merge_check_error()
def verify_merged(merged_dir, cfg, run_dir, *, reuse_recorded: bool = False, ref: dict | None = None) -> dict:
    """Checks 1-5; raise MergeCheckError if the checkpoint must not be scored. `ref`: build_reference's result.

    With ``reuse_recorded`` (what the eval stage passes), a passed ``merge_check.json``
    in `merged_dir` for byte-identical weight files, the same adapter, base model
    and dtype is returned as is, after check 1.
    """
    from lora import ADAPTER_WEIGHTS_NAME
    from lora.io import check_checkpoint_files, compare_checkpoint, file_sha256
    from markerlab.models import resolve_model_dir

    merged_dir, run_dir = Path(merged_dir), Path(run_dir)
    adapter_dir, aw = run_dir / "adapter", run_dir / "adapter" / ADAPTER_WEIGHTS_NAME
    if not merged_dir.is_dir():
        raise UserError(f"{merged_dir}: not found (run the merge stage first)")
    t0 = time.time()
    files = check_checkpoint_files(merged_dir)
    fp = {"files": files.pop("files"), "adapter_sha256": file_sha256(aw) if aw.is_file() else None,
          "base_model": cfg.model.name_or_path, "dtype": cfg.model.dtype}
    if reuse_recorded and (merged_dir / CHECK_NAME).is_file():
        try:
            old = read_json(merged_dir / CHECK_NAME)
        except UserError:
            old = {}
        if old.get("passed") and all(old.get(k) == v for k, v in fp.items()):
            return {**old, "reused": True}
        logger.info("merge check: %s does not match the files on disk; checking again", merged_dir / CHECK_NAME)
    device = resolve_device(cfg.model.device)
    ref = ref or build_reference(cfg, adapter_dir, device)
    files.update(compare_checkpoint(merged_dir, ref["model"]))
    logits = check_logits(merged_dir, cfg, adapter_dir, device, ref)  # frees the model in memory
    tensors = ref["tensors"]
    return {"passed": True, "merged_dir": str(merged_dir), "adapter_dir": str(adapter_dir),
            "base_model_dir": str(resolve_model_dir(cfg.model.name_or_path)), "device": device, **fp,
            "structure": files, "tensors": tensors, "logits": logits,
            "check_seconds": round(time.time() - t0, 3)}


def remove_partial_merges(run_dir: Path) -> list[str]:
    """Remove what a killed or failed merge left in `run_dir` (``.merged.tmp``, save_merged's temporaries)."""
    left = sorted(p for p in Path(run_dir).glob(".merged.*") if p.is_dir())
    for p in left:
        shutil.rmtree(p)
    if left:
        print(f"merge: removed {', '.join(p.name for p in left)}, left half-written in {run_dir} by an earlier run")
    return [p.name for p in left]


def merge(cfg, run_dir, overwrite: bool = False) -> dict:
    """base + run_dir/adapter -> run_dir/merged, verified; returns the check record. A finished merge (its
    merge_check.json present) is kept unless `overwrite`."""
    from lora import save_merged
    from lora.io import base_state_dict
    from markerlab.disk import check_free_space
    from markerlab.io import replace_dir
    from markerlab.models import load_tokenizer

    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    merged_dir, adapter_dir, tmp = rd.merged, rd.adapter, rd.merged_tmp
    if (merged_dir / CHECK_NAME).is_file() and not overwrite:
        logger.info("merge: %s exists and passed its check; skipping (overwrite=True redoes it)", merged_dir)
        return read_json(merged_dir / CHECK_NAME)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: file not found (run the train stage first)")
    remove_partial_merges(run_dir)  # before measuring free space: they hold some
    t0 = time.time()
    try:
        ref = build_reference(cfg, adapter_dir, resolve_device(cfg.model.device))
        # What save_pretrained writes: each stored tensor once (tied weights share one), in model.dtype.
        sizes = {t.data_ptr(): t.numel() * t.element_size() for t in base_state_dict(ref["model"]).values()}
        check_free_space(merged_dir, sum(sizes.values()), hint=f"the merged checkpoint in {cfg.model.dtype}; free space "
                                                               f"on that disk or point run.out_dir elsewhere")
        save_merged(ref["model"], load_tokenizer(cfg.model.name_or_path), tmp, overwrite=True)
        merge_seconds = time.time() - t0
        check = verify_merged(tmp, cfg, run_dir, ref=ref)
        check.update(merged_dir=str(merged_dir), merge_seconds=round(merge_seconds, 3))
        write_json(tmp / CHECK_NAME, check)
        replace_dir(tmp, merged_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    lg, t = check["logits"], check["tensors"]
    print(f"merge: {merged_dir} verified ({check['structure']['n_tensors']} tensors bit-identical to the merge in memory, "
          f"{t['n_adapted_changed']}/{t['n_adapted_tensors']} adapted tensors changed; logits max |diff| "
          f"{lg['max_abs_diff']:.3g} <= {lg['tolerance']:.3g}; the merged weights keep {lg['retention_projection']:.3f} "
          f"of the adapter's effect, cosine {lg['retention_cosine']:.4f})")
    return check
