"""Checks and facts about the Python environment: torch/torchvision, versions, device."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys

from medaudit.core.errors import EnvironmentProblem

#: torchvision's minor version for torch 2.x is x + 15 (2.4 -> 0.19, 2.11 -> 0.26, 2.14 -> 0.29).
TORCHVISION_OFFSET = 15


def matching_torchvision(torch_version: str | None) -> str:
    """The pip command that installs the torchvision built for ``torch_version`` (kept in step
    with pyproject.toml, which admits torch >= 2.4), or a fresh pair when torch is unknown."""
    match = re.match(r"2\.(\d+)", torch_version or "")
    if match is None:
        return "pip install 'torch>=2.4' 'torchvision>=0.19'"
    return f"pip install 'torchvision==0.{int(match.group(1)) + TORCHVISION_OFFSET}.*'"


def require_torchvision() -> None:
    """Import torchvision or explain how to get a working torch/torchvision pair.

    timm and segmentation-models-pytorch import torchvision; a torchvision built for
    another torch fails with ``operator torchvision::nms does not exist``.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, RuntimeError from the C++ ops
        torch_version = _version("torch") or "not installed"
        tv_version = _version("torchvision") or "not installed"
        raise EnvironmentProblem(
            f"torchvision cannot be imported (torch {torch_version}, torchvision "
            f"{tv_version}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Install the torchvision built for this torch: {matching_torchvision(torch_version)}"
        ) from exc


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


#: cuBLAS's workspace setting that makes its GEMMs deterministic on CUDA 10.2 and newer
#: (PyTorch's reproducibility notes); read when cuBLAS initialises, so set before any CUDA work.
CUBLAS_WORKSPACE = ":4096:8"


def configure_torch(runtime) -> None:
    """Apply the spec's ``runtime`` settings that must precede any tensor work: the CPU
    thread count and, with ``deterministic``, deterministic algorithms (an operation without
    a deterministic implementation then raises instead of running) and cuBLAS's workspace."""
    import torch

    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(runtime.deterministic)  # the spec decides, in every process


def select_device(requested: str) -> "torch.device":  # noqa: F821
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(
            f"runtime.device is {requested!r} but torch {torch.__version__} sees no CUDA device; "
            "use 'auto' or 'cpu'"
        )
    return torch.device(requested)


def describe_environment(device: "torch.device") -> dict:  # noqa: F821
    """Versions and hardware recorded in every run directory (reproducibility)."""
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {
            name: _version(name)
            for name in (
                "medaudit", "torch", "torchvision", "timm", "segmentation-models-pytorch",
                "adversarial-robustness-toolbox", "monai", "captum", "scikit-learn", "pydicom", "nibabel",
                "numpy", "pydantic", "pluggy",
            )
        },
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class GpuMonitor:
    """A job's GPU use for the report's provenance: peak memory allocated by torch and the
    mean utilisation over samples taken once per batch (``torch.cuda.utilization``, which
    needs NVML; None without it). Does nothing on other devices."""

    def __init__(self, device: "torch.device"):  # noqa: F821
        import torch

        self.device, self.samples = device, []
        self.active = device.type == "cuda"
        if self.active:
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if not self.active:
            return
        import torch

        try:
            self.samples.append(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - NVML missing: utilisation is simply not recorded
            self.active = False

    def summary(self) -> dict:
        """``gpu_memory_peak_mib`` and ``gpu_utilisation_percent`` (empty on the CPU)."""
        import torch

        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        mean = round(sum(self.samples) / len(self.samples), 1) if self.samples else None
        return {"gpu_memory_peak_mib": round(peak, 1), "gpu_utilisation_percent": mean}
