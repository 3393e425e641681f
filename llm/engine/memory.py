"""Sizing the KV cache from the memory actually free, and saying what was chosen.

Each of ``LLM_PARALLEL`` sequences gets a stream of a whole context window (``llm.engine.scheduler``), so the cache
costs parallel x window x (bytes per token). A 7B model with 32 x 4,096 slots wants about 16 GiB; a consumer
GPU has less, and llama.cpp would fail to create the context. After the weights are loaded, the free memory of
the device that holds the cache (the first GPU when layers are offloaded, else the host's available memory) is
read, and the number of sequences is lowered to what fits, with a log line either way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEADROOM = 0.85  # of the free memory; the rest is left for compute buffers and everything else
GIB = 1024 ** 3


@dataclass(frozen=True)
class CachePlan:
    """What the scheduler allocates: ``parallel`` streams of ``window`` tokens."""

    parallel: int
    window: int
    bytes_per_token: int
    free: int | None  # bytes free where the cache lives (None: unknown)
    where: str

    @property
    def total(self) -> int:
        return self.parallel * self.window * self.bytes_per_token


def kv_bytes_per_token(layers: int, kv_heads: int, key_length: int, value_length: int, bytes_per_value: int = 2) -> int:
    """Cache bytes one token takes in every layer (keys and values, f16 by default)."""
    return layers * kv_heads * (key_length + value_length) * bytes_per_value


def free_memory(on_gpu: bool) -> tuple[int | None, str]:
    """Free bytes where the cache will live: the first visible GPU (``nvidia-smi``) or the host
    (``MemAvailable``); None when it cannot be read."""
    if on_gpu and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split()
            return int(out[0]) * 1024 * 1024, "GPU 0"
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None, "GPU 0"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host memory"
    except (OSError, ValueError, IndexError):
        pass
    return None, "host memory"


def plan_cache(parallel: int, window: int, bytes_per_token: int, free: int | None, where: str) -> CachePlan:
    """The most sequences (up to ``parallel``) whose full windows fit in the usable part of ``free``."""
    fitting = parallel
    if free is not None and bytes_per_token > 0:
        fitting = max(1, min(parallel, int(free * HEADROOM) // (window * bytes_per_token)))
    return CachePlan(fitting, window, bytes_per_token, free, where)


def describe(plan: CachePlan, asked: int) -> tuple[int, str]:
    """The log level and line that say what was chosen and why."""
    size = f"{plan.total / GIB:.2f} GiB"
    free = "unknown free memory" if plan.free is None else f"{plan.free / GIB:.1f} GiB free on {plan.where}"
    if plan.parallel == asked:
        return logging.INFO, (f"KV cache: {plan.parallel} sequences x {plan.window} tokens x "
                              f"{plan.bytes_per_token // 1024} KiB = {size} ({free})")
    needed = asked * plan.window * plan.bytes_per_token / GIB
    too_big = plan.window * plan.bytes_per_token > (plan.free or 0) * HEADROOM
    return logging.WARNING, (
        f"KV cache: LLM_PARALLEL={asked} sequences x {plan.window} tokens would take {needed:.2f} GiB but {free}; "
        f"serving {plan.parallel} sequences ({size})"
        + ("; even one window does not fit: lower LLM_CONTEXT_WINDOW" if too_big else
           "; set LLM_PARALLEL or LLM_CONTEXT_WINDOW to choose"))
