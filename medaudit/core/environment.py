"""Checks and facts about the Python environment: torch/torchvision, versions, device."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from medaudit.core.errors import EnvironmentProblem

#: What to install when torch and torchvision do not match (kept in step with pyproject.toml).
MATCHING_PAIR = "pip install 'torch>=2.14,<2.15' 'torchvision>=0.29,<0.30'"


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
            f"Install a matching pair in this environment: {MATCHING_PAIR}"
        ) from exc


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


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
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
