"""Which device a stage runs on, decided in one place, without initializing CUDA to ask.

    from markerlab.devices import resolve_device, visible_cuda_devices, gpu_memory
    resolve_device("auto")        # "cuda" when a GPU is visible, else "cpu"
    visible_cuda_devices()        # ["0", "1"] or the parent's CUDA_VISIBLE_DEVICES entries (indices or UUIDs)
    gpu_memory(0)                 # free/total bytes of the first visible GPU and the processes holding it (NVML)

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
import sys
from dataclasses import dataclass
from pathlib import Path

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


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as NVML sees it (the whole device, every process)."""

    device: str                                   # the CUDA_VISIBLE_DEVICES entry (index or UUID)
    free: int                                     # bytes
    total: int                                    # bytes
    processes: tuple[tuple[int, int | None], ...]  # (pid, bytes used or None when NVML hides it)


def _nvml():
    """A pynvml module (nvidia-ml-py, or the copy vLLM ships once vllm is imported), or None."""
    try:
        import pynvml

        return pynvml
    except ImportError:
        pass
    if "vllm" in sys.modules:  # importing it here would run vLLM's process-wide env overrides
        try:
            from vllm.third_party import pynvml

            return pynvml
        except ImportError:
            pass
    return None


def _nvml_handle(nvml, entry: str):
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    if entry.startswith("GPU-"):  # CUDA accepts a unique UUID prefix; NVML wants the whole UUID
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = nvml.nvmlDeviceGetUUID(h)
            if (uuid.decode() if isinstance(uuid, bytes) else uuid).startswith(entry):
                return h
    return None  # MIG instances and unknown spellings: not resolved here


def gpu_memory(device: int = 0) -> GpuMemory | None:
    """Free and total memory of visible CUDA device `device` and who holds it, from NVML.

    NVML never initializes CUDA in this process, so this is safe before vLLM
    starts. None when there is no such device or NVML cannot answer (no
    pynvml, no driver, a MIG entry). The visible entry is taken as an NVML
    index, which is CUDA's ordinal under CUDA_DEVICE_ORDER=PCI_BUS_ID (and on
    a box of identical GPUs).
    """
    visible = visible_cuda_devices()
    nvml = _nvml() if device < len(visible) else None
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        h = _nvml_handle(nvml, visible[device])
        if h is None:
            return None
        info = nvml.nvmlDeviceGetMemoryInfo(h)
        procs = []
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs += [(int(p.pid), p.usedGpuMemory) for p in getattr(nvml, fn)(h)]
            except Exception:
                pass
        return GpuMemory(device=visible[device], free=int(info.free), total=int(info.total),
                         processes=tuple(dict(procs).items()))
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def process_name(pid: int) -> str:
    """The command line of `pid` (shortened), or "" when it is not visible from here."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return cmd if len(cmd) <= 80 else cmd[:77] + "..."
