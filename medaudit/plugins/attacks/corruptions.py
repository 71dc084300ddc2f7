"""Corruptions: gaussian-noise, shot-noise, defocus-blur, motion-blur, contrast, gamma, brightness, pixelate, downsample, jpeg, rician-noise, gibbs-ringing, kspace-spike, bias-field, ghosting, motion, ct-dose-noise, ct-streaks, slice-thickness, hu-window-shift, stain-variation, black-corners, bubbles, characters.

Natural and acquisition corruptions, one attack per operation of
:mod:`medaudit.plugins.attacks._corruption_ops` (MRI, CT, general, dermoscopy/pathology).

A corruption is a perturbation that no L-p norm bounds: it is sized by its own severity
(1 mildest .. 5 strongest, a :class:`~medaudit.core.components.Budget` with one parameter
per level), runs at its levels instead of the threat model's epsilons, gets its own rows
and is judged by its own budget check (the parameter each case got, recorded as the extra
``corruption_strength``, is the one its severity defines).

Severities are calibrated, as MedFM-Robust does, so that each level has a stated effect
size: on the calibration images (``corruption_severities.json`` names them, with the
command that wrote the table) severity s lowers the mean SSIM against the clean image to
:data:`TARGET_SSIM` [s - 1]. An operation too weak to reach a band at its most plausible
strength stays at that strength (the table says ``reached: false``). Every record keeps the
SSIM and PSNR its case actually got (as for every attack), so the report shows the effect
on the audited data.

Worst of k draws: a random corruption (noise, a random spike or bias field) is drawn
``draws`` times per case with the job's seeded generator, and each case keeps its worst
draw for the model (classification: the smallest margin of the true class, so a draw that
flips the prediction wins; segmentation: the lowest foreground Dice). The mean over the
draws is kept beside it (``draws_mean``: the share of draws classified correctly, or the
mean Dice), so a report shows both the typical effect and an adversarial-in-distribution
bound. Deterministic corruptions (contrast, gamma, blur...) have one draw.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Access, Attack, AttackFamily, AttackOutcome, Budget, Params, Task
from medaudit.core.lazy import torch
from medaudit.core.segmentation import dice_per_class, foreground_mean, is_dense
from medaudit.plugins.attacks._corruption_ops import OPS, Op
from medaudit.plugins.attacks._severities import SEVERITIES, TARGET_SSIM, severity_table


class CorruptionParams(Params):
    draws: int = Field(
        1, ge=1, le=100,
        description="k: a random corruption is drawn k times per case and each case keeps its worst draw for the "
        "model (the mean over the draws is kept beside it). Deterministic corruptions draw once.",
    )


def case_outcomes(output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per case: how well the model did on one draw (lower is worse; the worst draw is kept)
    and the score averaged over draws: the true class's logit margin and correctness for
    classification, the foreground Dice twice for segmentation."""
    if is_dense(y):
        dice = foreground_mean(dice_per_class(output.argmax(1), y, output.shape[1])).double()
        return dice, dice
    logits = output.double()
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), -math.inf).amax(1)
    return true - other, (logits.argmax(1) == y).double()


class Corruption(Attack):
    """A natural corruption at a calibrated severity, worst of ``draws`` seeded draws."""

    #: The operation (a key of ``OPS``).
    op: ClassVar[Op]
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    norms = frozenset()
    needs = Access.DECISIONS  # the worst draw is the one the model does worst on
    family = AttackFamily.CORRUPTION
    Params = CorruptionParams
    extra_names = ("corruption_strength", "draws_mean")

    def perturb(self, model, x, y, *, eps, norm, generator):
        op, strength = self.op, self.budget.limit(eps)
        if op.modality == "rgb" and x.shape[1] != 3:
            raise ValueError(f"{self.name} corrupts RGB images (3 channels); these have {x.shape[1]}")
        draws = self.params.draws if op.random else 1
        worst = worst_key = total = None
        for _ in range(draws):
            corrupted = op.fn(x, strength, generator)
            with torch.no_grad():
                key, score = case_outcomes(model(corrupted), y)
            if worst is None:
                worst, worst_key, total = corrupted, key, score
                continue
            take = key < worst_key
            worst = torch.where(take.view(-1, *[1] * (x.dim() - 1)), corrupted, worst)
            worst_key, total = torch.where(take, key, worst_key), total + score
        return AttackOutcome(worst, {"corruption_strength": [strength] * len(x), "draws_mean": total / draws})


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def corruption_class(name: str, op: Op, calibration: dict) -> type[Corruption]:
    """The attack class of one operation, its severities from the calibration table."""
    entry = calibration["corruptions"][name]
    reached = ", ".join(f"{s:.2f}" for s in entry["ssim"])
    description = (
        f"{op.parameter} at severity 1..5: {', '.join(f'{v:.4g}' for v in entry['parameters'])}, calibrated so that the "
        f"mean SSIM on {calibration['images']} falls to {', '.join(f'{t:.1f}' for t in TARGET_SSIM)} (reached: {reached}"
        + ("" if all(entry["reached"]) else "; a band out of reach at the most plausible strength keeps that strength")
        + f"). Definition: {op.source}."
    )
    doc = f"{name} ({op.modality}): {op.parameter}. {op.source}."
    return type(_class_name(name), (Corruption,), {
        "__doc__": doc, "__module__": __name__, "name": name, "op": op, "dims": op.dims,
        "budget": Budget(name="severity", levels=SEVERITIES, measure="corruption_strength", description=description,
                         table=tuple(entry["parameters"])),
    })


CORRUPTIONS: dict[str, type[Corruption]] = {}
_calibration = severity_table()
for _name, _op in OPS.items():
    CORRUPTIONS[_name] = globals()[_class_name(_name)] = corruption_class(_name, _op, _calibration)
RicianNoise = CORRUPTIONS["rician-noise"]


@hookimpl
def register_attacks(register):
    for cls in CORRUPTIONS.values():
        register(cls)
