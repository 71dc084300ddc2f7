"""What the run records of the device: GPU memory and utilisation per job (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from medaudit.core.environment import GpuMonitor


def test_gpu_monitor_records_nothing_on_the_cpu():
    monitor = GpuMonitor(torch.device("cpu"))
    monitor.sample()
    assert monitor.summary() == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_monitor_measures_the_peak_memory_of_a_job():
    device = torch.device("cuda")
    monitor = GpuMonitor(device)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB
    monitor.sample()
    summary = monitor.summary()
    del block
    assert summary["gpu_memory_peak_mib"] >= 64
    assert summary["gpu_utilisation_percent"] is None or 0 <= summary["gpu_utilisation_percent"] <= 100
