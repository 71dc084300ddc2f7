"""Natural corruptions: rician-noise.

Acquisition noise as a perturbation family that no L-p norm bounds: sized by its own
severity (:class:`~medaudit.core.components.Budget`), planned at its levels, recorded per
case and checked by its budget's rule. The first of the corruption family; the others
(artefacts, blur, contrast, dose...) and severities calibrated against SSIM are planned.

Rician noise is the noise of magnitude MR images (Gudbjartsson & Patz, "The Rician
distribution of noisy MRI data", Magn. Reson. Med. 34(6), 1995): Gaussian noise of standard
deviation sigma on the real and imaginary channels, then the magnitude,
``sqrt((x + sigma n1)^2 + (sigma n2)^2)``, the formula of MONAI's ``RandRicianNoise``. MONAI
draws its noise with numpy on the CPU and copies it to the device; this one draws it with
the job's torch generator on the model's device, and a test checks it against MONAI's
distribution.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from medaudit import hookimpl
from medaudit.core.components import Access, Attack, AttackFamily, AttackOutcome, Budget, Task

#: Noise standard deviation per severity step, in the [0, 1] intensity range.
RICIAN_SIGMA_PER_SEVERITY = 0.02


class RicianNoise(Attack):
    """Rician noise of the magnitude MR image: severity s adds noise of standard deviation 0.02 s
    (s = 1..5 gives 0.02..0.10 of the intensity range) to every case.

    Severity scale: this package's own, linear in sigma (SNR of a full-intensity voxel
    50 at s = 1, 10 at s = 5); not yet calibrated against SSIM bands. The noise does not look
    at the model, so it measures robustness to acquisition noise, not a worst case; each
    case's draw is seeded, so a run is reproducible. Outputs are clipped to [0, 1].
    """

    name = "rician-noise"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset()
    needs = Access.DECISIONS  # nothing at all, in fact: the model is not queried
    family = AttackFamily.CORRUPTION
    budget: ClassVar[Budget] = Budget(
        name="severity",
        levels=(1.0, 2.0, 3.0, 4.0, 5.0),
        measure="noise_std",
        description="Severity s adds Rician noise of standard deviation 0.02 s of the [0, 1] intensity range "
        "(Gudbjartsson & Patz 1995; the formula of MONAI's RandRicianNoise); the scale is this package's own.",
        scale=RICIAN_SIGMA_PER_SEVERITY,
    )
    extra_names = ("noise_std",)

    def perturb(self, model, x, y, *, eps, norm, generator):
        sigma = self.budget.limit(eps)
        n1 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        n2 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noisy = torch.sqrt((x + sigma * n1) ** 2 + (sigma * n2) ** 2).clamp(0, 1)
        return AttackOutcome(noisy, {"noise_std": [sigma] * len(x)})


@hookimpl
def register_attacks(register):
    register(RicianNoise)
