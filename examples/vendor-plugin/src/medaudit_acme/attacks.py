"""Attacks: contrast-shift.

A worst-case window/level change: the scanner's contrast and brightness, two numbers per
image, chosen by gradient ascent on the model's loss within an L-inf budget.
"""

from __future__ import annotations

from pydantic import Field

from medaudit import CROSS_ENTROPY, Access, Attack, AttackFamily, Norm, Params


class ContrastShiftParams(Params):
    steps: int = Field(10, ge=1, le=1000, description="Signed-gradient steps on the gain and the offset.")
    step_fraction: float = Field(
        0.25, gt=0, le=1,
        description="Step size as a fraction of eps (offset) or of the gain that moves a pixel by eps.",
    )


class ContrastShift(Attack):
    """Worst-case contrast and brightness shift: ``x + clip(gain * (x - mean) + offset, -eps, eps)``.

    Each image gets one gain and one offset, found by signed-gradient ascent on the
    cross-entropy; the change of every pixel is clipped to the L-inf budget and the image to
    [0, 1]. Untargeted, white box (gradients), deterministic (it starts from no change).
    Models the acquisition variation a window/level setting brings, not a pixel pattern.
    """

    name = "contrast-shift"
    norms = frozenset({Norm.LINF})
    needs = Access.GRADIENTS
    family = AttackFamily.ITERATIVE
    loss_kinds = frozenset({CROSS_ENTROPY})
    Params = ContrastShiftParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        # torch is imported here, not at the top: medaudit imports every plugin to read its
        # components, and `medaudit validate` should not pay torch's import for that.
        import torch
        import torch.nn.functional as F

        p: ContrastShiftParams = self.params
        if eps == 0:
            return x.clone()
        per_image = (len(x),) + (1,) * (x.dim() - 1)
        centred = x - x.flatten(1).mean(1).view(per_image)
        # A gain step that moves the image's most extreme pixel by step_fraction * eps.
        gain_step = p.step_fraction * eps / centred.flatten(1).abs().amax(1).clamp_min(1e-6).view(per_image)
        gain = torch.zeros(per_image, device=x.device, dtype=x.dtype)
        offset = torch.zeros(per_image, device=x.device, dtype=x.dtype)

        def shifted(gain, offset):
            return (x + (gain * centred + offset).clamp(-eps, eps)).clamp(0, 1)

        best, best_loss = x.clone(), torch.full((len(x),), float("-inf"), device=x.device)
        for _ in range(p.steps):
            gain, offset = gain.detach().requires_grad_(True), offset.detach().requires_grad_(True)
            x_adv = shifted(gain, offset)
            loss = F.cross_entropy(model(x_adv).float(), y, reduction="none")
            grad_gain, grad_offset = torch.autograd.grad(loss.sum(), (gain, offset))
            better = loss.detach() > best_loss  # each image keeps its worst iterate so far
            best = torch.where(better.view(per_image), x_adv.detach(), best)
            best_loss = torch.where(better, loss.detach(), best_loss)
            gain = gain + gain_step * grad_gain.sign()
            offset = offset + p.step_fraction * eps * grad_offset.sign()
        with torch.no_grad():
            x_adv = shifted(gain, offset)
            loss = F.cross_entropy(model(x_adv).float(), y, reduction="none")
            return torch.where((loss > best_loss).view(per_image), x_adv, best)
