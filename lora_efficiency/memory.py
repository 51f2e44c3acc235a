"""Memory of the training process, sampled in a background thread: NVML per process on a GPU, RSS on the CPU."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

MB = 1024 * 1024
# 100 ms: one RSS read costs ~20 us and one NVML query ~0.1 ms, so sampling takes < 0.2 % of a core, and a
# 100 ms window still sees the forward/backward peak of any step longer than that (CPU steps here are seconds).
DEFAULT_INTERVAL_S = 0.1


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so it measures from now; Linux >= 4.0, own process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class MemorySampler:
    """Samples this process's memory every `interval_s` between start() and stop().

    On CUDA: NVML's per-process used memory (what nvidia-smi shows: allocator cache and CUDA context included)
    and torch's max_memory_allocated. When NVML does not list this process (a container's own PID namespace
    hides it, as can MIG), a sample is torch's memory_reserved instead (the allocator's cache, CUDA context
    excluded) and the peak takes torch's max_memory_reserved, the counter that sees between samples; `source`
    says which. Elsewhere, or without NVML: resident set size.
    """

    device: torch.device
    interval_s: float = DEFAULT_INTERVAL_S
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0
    _nvml_reads: int = 0  # samples NVML answered for this process
    _torch_reads: int = 0  # samples taken from torch's allocator because NVML did not list the process

    def __post_init__(self):
        self._process = psutil.Process()
        self._nvml_handle = None
        if self.device.type == "cuda":
            try:
                import pynvml  # lazy: NVIDIA's library, used on CUDA only (absent or driverless on a CPU machine)

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:  # no NVML (some containers): RSS is the honest fallback
                self._nvml_handle = None

    def read_mb(self) -> float:
        if self._nvml_handle is not None:
            import pynvml  # lazy: as in __post_init__

            pid = os.getpid()
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    self._nvml_reads += 1
                    return proc.usedGpuMemory / MB
            self._torch_reads += 1
            return torch.cuda.memory_reserved(self.device) / MB
        if self.device.type == "cuda":  # no NVML at all
            self._torch_reads += 1
            return torch.cuda.memory_reserved(self.device) / MB
        return self._process.memory_info().rss / MB

    @property
    def source(self) -> str:
        """Where the figures come from, as a tag: "rss", "nvml" (per process, as nvidia-smi shows),
        "torch_reserved" (NVML never listed the process, or there is no NVML), or "nvml+torch_reserved (k of n
        samples)" when NVML listed it only at times."""
        if self.device.type != "cuda":
            return "rss"
        if not self._torch_reads:
            return "nvml"
        if not self._nvml_reads:
            return "torch_reserved"
        return f"nvml+torch_reserved ({self._torch_reads} of {self._torch_reads + self._nvml_reads} samples)"

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.samples.append((time.perf_counter() - self._t0, self.read_mb()))

    def start(self) -> MemorySampler:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self._t0 = time.perf_counter()
        self.samples.append((0.0, self.read_mb()))
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.samples.append((time.perf_counter() - self._t0, self.read_mb()))

    def current_mb(self) -> float:
        return self.samples[-1][1] if self.samples else self.read_mb()

    def summary(self) -> dict[str, float]:
        """Peak figures in MB. memory/peak_mb is the device's peak: max of the samples and the exact counters."""
        sampled = max(mb for _, mb in self.samples) if self.samples else self.read_mb()
        out = {"memory/sampled_peak_mb": sampled}
        if self.device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(self.device) / MB
            out["memory/torch_peak_allocated_mb"] = allocated
            out["memory/peak_mb"] = max(sampled, allocated)
            if self._torch_reads:  # samples of the current reserved memory: the peak counter sees between them
                reserved = torch.cuda.max_memory_reserved(self.device) / MB
                out["memory/torch_peak_reserved_mb"] = reserved
                out["memory/peak_mb"] = max(out["memory/peak_mb"], reserved)
        else:
            hwm = _peak_rss_mb()
            if hwm is not None:
                out["memory/peak_rss_mb"] = hwm
            out["memory/peak_mb"] = max(sampled, hwm or 0.0)
        return out

    def trace_csv(self) -> str:
        return "seconds,memory_mb\n" + "".join(f"{t:.3f},{mb:.1f}\n" for t, mb in self.samples)


# ---------------------------------------------------------------------------------------------------------
