"""Resumable training state: checkpoints/step_{N:06d}/ with everything a bitwise-exact resume needs.

    lora.pt       the LoRA tensors (lora_state_dict), float32 on the CPU
    optimizer.pt  AdamW's state_dict (moments, step counts, param-group lrs)
    state.pt      step, the current epoch's permutation, the loss history, the
                  data fingerprint, every RNG state: the data-order and dropout
                  generators, torch's CPU and CUDA generators, Python's `random`
                  and NumPy's global state

The position in the data order is the step count itself plus the current
permutation (trainer/schedule.py: step s is epoch s // steps_per_epoch, slice
s % steps_per_epoch of that epoch's permutation); the data-order generator's
state is the one after drawing that permutation, so the next epoch draws what
an uninterrupted run would.

    checksums.json  size and sha256 of each file above, written last

Atomic: a checkpoint is written into a hidden temporary directory beside the
final one and renamed into place, so a process killed mid-save leaves either
the old set of checkpoints or the new one, plus a `.tmp-*` directory that the
next run deletes. Verified before it is trusted: `latest_checkpoint` returns
the newest checkpoint whose files match its checksums.json (one cut short or
changed on disk is named, removed, and the older kept one used instead). A
checkpoint from before checksums.json is verified by loading its files.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from lora import load_lora_state_dict, lora_state_dict
from markerlab.io import file_record, make_temp_dir, read_json, replace_dir, write_json
from markerlab.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
CHECKSUMS = "checksums.json"


def rng_states(data_gen: torch.Generator, dropout_gen: torch.Generator) -> dict:
    import numpy as np

    return {
        "data_order": data_gen.get_state(),
        "dropout": dropout_gen.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_states(states: dict, data_gen: torch.Generator, dropout_gen: torch.Generator) -> None:
    import numpy as np

    data_gen.set_state(states["data_order"])
    dropout_gen.set_state(states["dropout"])
    torch.set_rng_state(states["torch_cpu"])
    if states["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


class _Writes:
    """A file torch.save writes through, keeping the OSError of a failed write (torch reports only its own
    RuntimeError from inline_container.cc, which names neither the file nor the cause)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save(obj, path: Path, shown: Path) -> None:
    """torch.save `obj` to `path`; a failed write (a full disk) is one line naming `shown`, the file's final name."""
    try:
        with open(path, "wb") as f:
            out = _Writes(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{shown}: cannot write ({e.strerror or e})") from None


def save_checkpoint(root: Path, name: str, model, optimizer, state: dict, extra: dict | None = None) -> Path:
    """Write root/name atomically; `extra` maps file names to more objects (post-mortem grads).

    A write that fails (a full disk) is one line naming the checkpoint's file; what
    was written of it is removed and the older checkpoints stay as they were.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, prefix=f".tmp-{name}-")
    final = root / name
    try:
        _save({k: v.to("cpu", copy=True) for k, v in lora_state_dict(model).items()}, tmp / "lora.pt",
              final / "lora.pt")
        _save(optimizer.state_dict(), tmp / "optimizer.pt", final / "optimizer.pt")
        for fname, obj in (extra or {}).items():
            _save(obj, tmp / fname, final / fname)
        _save(state, tmp / "state.pt", final / "state.pt")
        # last: what the files must be for the checkpoint to be trusted
        write_json(tmp / CHECKSUMS, {p.name: file_record(p) for p in sorted(tmp.iterdir())})
        try:
            replace_dir(tmp, final)
        except OSError as e:
            raise UserError(f"{final}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / name


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished step checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None when every file verifies)."""
    sums = path / CHECKSUMS
    if not sums.is_file():  # written before checksums existed: trust it if every file loads
        for name in ("lora.pt", "optimizer.pt", "state.pt"):
            try:
                torch.load(path / name, map_location="cpu", weights_only=False)
            except Exception as e:  # truncated or corrupt: torch raises several types
                return f"{name} does not load ({type(e).__name__})"
        return None
    try:
        want = read_json(sums)
    except UserError as e:
        return str(e)
    for name in ("lora.pt", "optimizer.pt", "state.pt"):
        if name not in want:
            return f"{CHECKSUMS} lists no {name}"
    for name, rec in want.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        now = file_record(p)
        if now != rec:
            what = "size" if now["size"] != rec["size"] else "sha256"
            return f"{name}: {what} differs from {CHECKSUMS} ({now['size']} bytes, recorded {rec['size']})"
    return None


def latest_checkpoint(root: Path, log=None) -> Path | None:
    """The newest step checkpoint that verifies; newer damaged ones are named (on stderr) and removed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for step, path in reversed(step_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is damaged ({problem}); removed it, resuming from an older one (or step 0)")
        shutil.rmtree(path)
    return None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints (post-mortem nan_step_* ones are never pruned)."""
    for _, p in step_checkpoints(root)[:-keep]:
        shutil.rmtree(p)


def remove_partial(root: Path) -> None:
    """Delete temporary directories left by a process killed while saving."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.endswith(".old"):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, device) -> dict:
    """Put the LoRA tensors and the optimizer state back; return state.pt's dict (RNGs not yet applied)."""
    # weights_only=False: state.pt holds Python/NumPy RNG tuples; these are our own files.
    load_lora_state_dict(model, torch.load(path / "lora.pt", map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
