"""Which device a stage runs on, decided in one place, without initializing CUDA to ask.

    from markerlab.devices import resolve_device, visible_cuda_devices
    resolve_device("auto")        # "cuda" when a GPU is visible, else "cpu"
    visible_cuda_devices()        # ["0", "1"] or the parent's CUDA_VISIBLE_DEVICES entries (indices or UUIDs)

Why not `torch.cuda.is_available()`: it calls cudaGetDeviceCount, which
initializes the CUDA driver in this process. A process that has done so cannot
fork a child that uses CUDA, and vLLM starts its engine workers with fork unless
CUDA is already *initialized* in torch's sense (`torch.cuda.is_initialized()`),
which the driver call does not set: the engine then dies in its worker. Counting
through NVML (what torch itself does under PYTORCH_NVML_BASED_CUDA_CHECK=1)
leaves the driver alone.
"""

from __future__ import annotations

import os

from .errors import UserError

DEVICE_SETTINGS = ("auto", "cuda", "cpu")


def cuda_device_count() -> int:
    """Visible CUDA devices, counted through NVML (the driver stays uninitialized)."""
    try:
        import torch
    except ImportError:
        return 0
    if not torch.backends.cuda.is_built() and not getattr(torch.version, "cuda", None):
        return 0
    if torch.cuda.is_initialized():  # already paid for: ask the runtime
        return torch.cuda.device_count()
    count = getattr(torch.cuda, "_device_count_nvml", None)
    n = count() if count is not None else -1
    if n < 0:  # NVML not usable: fall back to the runtime (initializes the driver)
        return torch.cuda.device_count()
    return n


def visible_cuda_devices() -> list[str]:
    """The CUDA devices this process may use, as entries for a child's CUDA_VISIBLE_DEVICES.

    Under a scheduler's CUDA_VISIBLE_DEVICES=4,5,6,7 (or UUIDs) these are "4".."7"
    (or the UUIDs), so a worker given one entry lands on that physical GPU.
    """
    n = cuda_device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n)]
    entries = [e.strip() for e in env.split(",") if e.strip()]
    return entries[:n]


def resolve_device(setting: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is a one-line error."""
    if setting not in DEVICE_SETTINGS:
        raise UserError(f"model.device: expected one of {', '.join(DEVICE_SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return "cpu"
    has_gpu = cuda_device_count() > 0
    if setting == "cuda" and not has_gpu:
        raise UserError('model.device = "cuda" but no CUDA device is visible (use "auto" or "cpu")')
    return "cuda" if has_gpu else "cpu"
