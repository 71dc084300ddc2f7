"""Looking inside the audited model for the report's figures: the penultimate features
(the input of the last ``nn.Linear``) and Grad-CAM maps (at the last ``nn.Conv2d``).

Layers are chosen by module order (``model.modules()``, the order in which they are
registered), not by execution order; a model with no such layer simply gets no such
figure. For a timm/torchvision ResNet the last ``nn.Conv2d`` by module order is the 1x1
projection on the shortcut of the last block when that block has one (its output is added
to the block's main branch, so the gradient reaching it is the block output's gradient),
else the last convolution of the main branch. Neither probe changes the model: hooks are
removed on exit, parameters keep their values and ``requires_grad`` flags, and Grad-CAM
runs in eval mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from medaudit.core.lazy import nn, torch


def last_layer(model: nn.Module, kind: type[nn.Module]) -> nn.Module | None:
    """The last submodule of type ``kind`` in module order, or None."""
    found = None
    for module in model.modules():
        if isinstance(module, kind):
            found = module
    return found


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class FeatureTap:
    """Collects the input of the model's last ``nn.Linear`` during the forward passes run
    inside :meth:`capture`, for the cases whose position in the data set is below ``limit``.

    Inputs with more than two dimensions (tokens x features) are averaged over the middle
    dimensions. Features stay on the model's device as float16 until :meth:`result`.
    """

    def __init__(self, model: nn.Module, limit: int):
        self.layer = last_layer(model, nn.Linear)
        self.limit = limit
        self._index: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []
        self._seen: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self, positions: torch.Tensor) -> Iterator[None]:
        """Record the features of the forward pass run in this block; ``positions`` are the
        data set positions of the batch's cases, in batch order."""
        keep = positions < self.limit
        if self.layer is None or not bool(keep.any()):
            yield
            return

        def hook(module, args):
            self._seen = args[0]

        handle = self.layer.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        seen, self._seen = self._seen, None
        if seen is None or seen.shape[0] != len(positions):
            return  # the layer did not run once on the whole batch: nothing to attribute to cases
        if seen.dim() > 2:
            seen = seen.flatten(1, -2).float().mean(1)
        self._index.append(positions[keep])
        self._features.append(seen[keep].detach().to(torch.float16))

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions, features)`` on the CPU, or None when nothing was captured."""
        if not self._features:
            return None
        return torch.cat(self._index).cpu(), torch.cat(self._features).cpu()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Grad-CAM (Selvaraju et al. 2017) of class ``target[i]`` for image ``x[i]`` at the
    model's last ``nn.Conv2d``, upsampled bilinearly to the image and scaled so each map's
    maximum is 1 (an all-zero map stays zero): ``N x H x W`` in [0, 1] on the CPU.

    Uses captum's ``LayerGradCam`` (ReLU on the weighted sum). Runs in eval mode; gradients
    are taken with respect to the layer's output only, so the frozen parameters get none.
    Returns None when the model has no ``nn.Conv2d``.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    layer = last_layer(model, nn.Conv2d)
    if layer is None:
        return None
    device = model_device(model)
    with _eval_mode(model), torch.enable_grad():
        cam = LayerGradCam(model, layer).attribute(
            x.to(device), target=target.to(device).tolist(), relu_attributions=True
        )
        cam = LayerAttribution.interpolate(cam.detach().float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    cam = cam[:, 0].clamp_min(0).cpu()
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp(0, 1)
