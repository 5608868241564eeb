"""Where a latency was measured, and the on-disk cache keyed by it (spec §11).

A measured latency depends on the device (the GPU's name, or the CPU's model and vector
extension), the CPU thread count, the torch version and, on Linux with glibc, the allocator:
glibc's dynamic mmap threshold makes some large activations page-fault on every call (seen:
ResNet-56 at batch 64 took 187 ms instead of 127 ms, and single layers jumped 10× between
neighbouring widths), which no per-layer model can compose. :func:`fix_glibc_malloc` (or
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set in the environment, or
jemalloc/tcmalloc) removes that; the allocator setting is part of the cache key.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_MALLOC_FIXED = False


def device_name(device: torch.device) -> str:
    """The device as the cache knows it: the GPU's name, or the CPU's architecture, model and
    vector extension."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{_cpu_model()}:{torch.backends.cpu.get_cpu_capability()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: Channels per vector block of the CPU's convolution kernels, by ``get_cpu_capability()``.
CPU_BLOCKS = {"AVX512": 16, "AVX512_BF16": 16, "AVX512_VNNI": 16, "AVX512_AMX": 16, "AVX2": 8, "SVE256": 8}


def channel_block(device: torch.device) -> int:
    """The width multiple convolutions run fastest at on ``device``: oneDNN's channel block on
    CPU (16 with AVX-512, 8 with AVX2; 1 where unknown), 8 on CUDA (tensor cores). A width
    between two multiples costs about as much as the next one (the kernels pad to the block),
    so grids are measured at multiples and ``round_to="auto"`` rounds latency targets to it."""
    if device.type == "cuda":
        return 8
    if device.type == "cpu":
        return CPU_BLOCKS.get(torch.backends.cpu.get_cpu_capability(), 1)
    return 1


def fix_glibc_malloc(threshold: int = 1 << 30) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (no per-call page faults on large
    activations, steadier and faster CPU latency). Returns False where glibc is not found."""
    global _MALLOC_FIXED
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_FIXED = bool(libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, threshold))
    return _MALLOC_FIXED


def allocator_name() -> str:
    """How CPU memory is allocated, as far as it changes latency (part of the cache key)."""
    fixed = _MALLOC_FIXED or "MALLOC_MMAP_THRESHOLD_" in os.environ
    preload = os.path.basename(os.environ.get("LD_PRELOAD", ""))
    return preload or ("glibc-fixed-thresholds" if fixed else "default")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_ifprune/latency`` (default ``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_ifprune" / "latency"


@dataclass(frozen=True)
class LatencyEnv:
    """What a measured latency depends on besides the layer: device, CPU threads, torch, allocator."""

    device: str
    threads: int
    torch: str
    allocator: str = "default"

    @classmethod
    def current(cls, device: torch.device) -> LatencyEnv:
        """The environment measurements on ``device`` are taken in now."""
        return cls(device_name(device), torch.get_num_threads(), torch.__version__, allocator_name())

    def key(self) -> str:
        """A short stable name for the cache file."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class LatencyCache:
    """Measured milliseconds per ``signature|in x out`` for one environment, in a JSON file."""

    def __init__(self, env: LatencyEnv, cache_dir: str | Path | None = None) -> None:
        self.env = env
        self.path = Path(cache_dir or default_cache_dir()) / f"{env.key()}.json"
        self.points: dict[str, float] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("env") == asdict(env):
                self.points = {str(k): float(v) for k, v in data.get("points", {}).items()}

    def save(self) -> None:
        """Write the file atomically (a concurrent reader sees the old or the new one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"env": asdict(self.env), "points": self.points}, indent=1, sort_keys=True))
        tmp.replace(self.path)
