"""Peak memory of this process, for the start and end events (what a run needs to fit)."""
from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """{"peak_rss_mb": ...} (the process's high-water resident set) and, on CUDA, "peak_cuda_mb"."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}  # bytes on macOS, KiB on Linux
    if device is not None and device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
