"""The memory sampler on a GPU, with NVML and torch's CUDA counters faked: which figure it reports, and its label."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from lora_efficiency.memory import MB, MemorySampler


class FakeNvml:
    """pynvml with one device whose process list holds `pids` (usedGpuMemory `used_mb` each)."""

    def __init__(self, pids, used_mb=900.0):
        self.pids, self.used_mb = pids, used_mb

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=int(self.used_mb * MB)) for pid in self.pids()]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's counters: 500 MB reserved now, 800 MB reserved at most, 600 MB allocated at most."""
    counters = {"reserved": 500.0, "max_reserved": 800.0, "max_allocated": 600.0}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(counters["reserved"] * MB))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: int(counters["max_reserved"] * MB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(counters["max_allocated"] * MB))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    return counters


def _sampled(monkeypatch, nvml) -> MemorySampler:
    if nvml is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = MemorySampler(torch.device("cuda", 0), interval_s=1e6)  # no background samples: start and stop only
    sampler.start()
    sampler.stop()
    return sampler


def test_nvml_per_process_figure_when_nvml_lists_the_process(monkeypatch, fake_cuda):
    import os

    sampler = _sampled(monkeypatch, FakeNvml(lambda: [os.getpid()]))
    assert [mb for _, mb in sampler.samples] == [900.0, 900.0]
    assert sampler.source == "nvml"
    summary = sampler.summary()
    assert summary["memory/peak_mb"] == 900.0  # NVML's figure holds the CUDA context: above torch's counters
    assert "memory/torch_peak_reserved_mb" not in summary


def test_fallback_is_labelled_and_takes_the_peak_counter(monkeypatch, fake_cuda):
    """A container's PID namespace: NVML lists another pid. Samples are torch's current reserved memory (500 MB),
    the peak is its max_memory_reserved (800 MB) which saw what happened between samples, and the tag says so."""
    sampler = _sampled(monkeypatch, FakeNvml(lambda: [1]))
    assert [mb for _, mb in sampler.samples] == [500.0, 500.0]
    assert sampler.source == "torch_reserved"
    summary = sampler.summary()
    assert summary["memory/torch_peak_reserved_mb"] == 800.0
    assert summary["memory/peak_mb"] == 800.0  # not the 500 MB current reading the sampler used to report


def test_nvml_listing_the_process_only_at_times_is_labelled_with_counts(monkeypatch, fake_cuda):
    import os

    calls = iter([[os.getpid()], [1]])
    sampler = _sampled(monkeypatch, FakeNvml(lambda: next(calls)))
    assert [mb for _, mb in sampler.samples] == [900.0, 500.0]
    assert sampler.source == "nvml+torch_reserved (1 of 2 samples)"
    assert sampler.summary()["memory/peak_mb"] == 900.0


def test_without_nvml_the_gpu_figures_are_torchs(monkeypatch, fake_cuda):
    sampler = _sampled(monkeypatch, None)
    assert sampler.source == "torch_reserved"
    assert [mb for _, mb in sampler.samples] == [500.0, 500.0]  # the device's memory, not the host's RSS
    assert sampler.summary()["memory/peak_mb"] == 800.0


def test_cpu_runs_are_labelled_rss():
    sampler = MemorySampler(torch.device("cpu"), interval_s=1e6).start()
    sampler.stop()
    assert sampler.source == "rss" and sampler.summary()["memory/peak_mb"] > 0
