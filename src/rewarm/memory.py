"""Peak memory of this process, for the start and end events (what a run needs to fit).

`peak_rss_mb` is the process's high-water mark since it started, so it includes loading the model
(transformers may hold a second copy of the weights while it loads) and saving it. What training
itself needs is measured separately on Linux: the kernel's high-water mark is reset after start-up
(`/proc/self/clear_refs`) and read back before `final/` is written (`peak_rss_train_mb`).
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """{"peak_rss_mb": ...} (the process's high-water resident set) and, on CUDA, "peak_cuda_mb"."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}  # bytes on macOS, KiB on Linux
    if device is not None and device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def reset_rss_peak() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM) from the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_since_reset_mb() -> float | None:
    """VmHWM in MB (the high-water mark since the last reset), or None where /proc has no such line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
