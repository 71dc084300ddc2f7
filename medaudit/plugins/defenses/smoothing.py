"""Randomized smoothing: randomized-smoothing (Cohen et al. 2019), certified L2 robustness.

``randomized-smoothing`` replaces the model by its smoothed classifier under Gaussian
noise ``N(0, sigma^2 I)`` in the [0, 1] pixel unit (unclamped; see
:mod:`medaudit.core.smoothing`). Two things come out of it:

- a *certificate* per case (:meth:`RandomizedSmoothing.certify`, CERTIFY of Cohen et al.,
  https://arxiv.org/abs/1902.02918): a class and an L2 radius within which no perturbation
  changes the smoothed prediction, with probability at least ``1 - alpha`` over the noise.
  It is computed on the *base* model with ``n0 + n`` noisy forward passes per case;
- the *deployed* module the attacks run against: the soft smoothed classifier (log of the
  base model's softmax averaged over ``attack_samples`` fresh draws per forward pass), which
  Salman et al. (NeurIPS 2019) attack. It is randomised, so a naive attack differentiates a
  few draws; the view ``eot`` averages ``eot_samples`` draws (Expectation over
  Transformation), the attack a randomised defense must face.

The certificate is only as useful as the base model is accurate under noise: Cohen et al.
train the base model with Gaussian noise of the same sigma. A model trained without noise
still gets valid certificates, but mostly abstentions and small radii
(:meth:`RandomizedSmoothing.caveats` says so for the report). Classification only.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.lazy import nn, torch
from medaudit.core.models import prepare_for_audit

if TYPE_CHECKING:
    from medaudit.core.smoothing import Certificate


class RandomizedSmoothingParams(Params):
    sigma: float = Field(
        0.25, gt=0, le=4,
        description="Standard deviation of the Gaussian noise in the [0, 1] pixel unit (Cohen et al.: 0.12 to 1.0).",
    )
    n0: int = Field(100, ge=1, description="Noise draws that select the top class before it is counted (CERTIFY's n0).")
    n: int = Field(
        10_000, ge=1,
        description="Noise draws that count the top class (CERTIFY's n): more draws, tighter bound and larger radii.",
    )
    alpha: float = Field(0.001, gt=0, lt=0.5, description="Each certificate fails with probability at most alpha.")
    batch: int = Field(1000, ge=1, description="Noisy copies per forward pass of the base model while certifying.")
    attack_samples: int = Field(
        8, ge=1, le=10_000,
        description="Noise draws averaged per forward pass of the deployed soft smoothed classifier.",
    )
    eot_samples: int = Field(
        32, ge=1, le=10_000,
        description="Noise draws averaged per forward pass of the EOT view the adaptive attack uses.",
    )
    trained_sigma: float | None = Field(
        None, gt=0,
        description="The Gaussian noise sigma the base model was trained with; None = not trained with noise: a "
                    "certificate still holds for the smoothed classifier but its accuracy is usually poor -- the "
                    "report warns.",
    )


class RandomizedSmoothing(Defense):
    """Randomized smoothing (Cohen et al. 2019): the class the base model predicts most often
    under Gaussian noise, with a certified L2 radius per case. Deployed as the soft smoothed
    classifier (mean softmax over attack_samples draws); attacked naively and with EOT over
    eot_samples draws (Salman et al. 2019).

    How the runner certifies (the attacks need nothing more): for each batch ``x`` of the
    evaluation set on the device, call ``defense.certify(base, x, generator)`` with ``base``
    the *undefended* :class:`LoadedModel` (or its module, before any speed wrapper; a module
    this defense returned is unwrapped to its base) and a ``torch.Generator`` seeded per
    batch; it returns a :class:`~medaudit.core.smoothing.Certificate` whose ``rows()`` go
    into the records and whose radii and predictions give
    :func:`~medaudit.core.smoothing.certified_accuracy` at the spec's L2 epsilons.
    :meth:`caveats` gives the warnings the report shows beside the certificate."""

    name = "randomized-smoothing"
    Params = RandomizedSmoothingParams
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({2, 3})
    views: ClassVar[dict[str, str]] = {
        "eot": ("EOT (Salman et al. 2019): the smoothed soft classifier's log mean softmax over eot_samples noise "
                "draws, so the gradient is the average over draws"),
    }
    #: The EOT view averages over the noise: attacks on it handle the randomness.
    averaging_views: ClassVar[frozenset[str]] = frozenset({"eot"})
    certifies: ClassVar[bool] = True

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        from medaudit.core.smoothing import SmoothedLogits

        p: RandomizedSmoothingParams = self.params
        system = prepare_for_audit(SmoothedLogits(model.module, p.sigma, p.attack_samples))
        eot = prepare_for_audit(SmoothedLogits(model.module, p.sigma, p.eot_samples))
        params = ", ".join(f"{k}={v}" for k, v in p.model_dump().items())
        return dataclasses.replace(
            model,
            module=system,
            adaptive_module=None,
            views={"eot": eot},
            description=f"{model.description}, behind {self.name} ({params}; randomized)",
        )

    def certify(self, model: LoadedModel | nn.Module, x: torch.Tensor,
                generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY (Cohen et al. 2019) of each input of ``x`` with this defense's sigma, n0,
        n, alpha and batch, on the base classifier: ``model`` is the undefended model or its
        module; a smoothed module this defense built is unwrapped to its base, so the noise is
        never added twice. ``x`` must be on the model's device; ``generator`` (best on that
        device too) makes the certificate reproducible."""
        from medaudit.core.smoothing import SmoothedLogits, certify

        p: RandomizedSmoothingParams = self.params
        module = model.module if isinstance(model, LoadedModel) else model
        if isinstance(module, SmoothedLogits):
            module = module.base
        return certify(module, x, sigma=p.sigma, n0=p.n0, n=p.n, alpha=p.alpha, batch=p.batch, generator=generator)

    def caveats(self) -> list[str]:
        """Warnings for the report: a base model not trained with noise of this sigma."""
        p: RandomizedSmoothingParams = self.params
        if p.trained_sigma is None:
            return [(f"the base model was not trained with Gaussian noise: its certificates at sigma={p.sigma} hold, "
                     "but the smoothed classifier's accuracy is usually poor (many abstentions, small radii); Cohen et "
                     "al. (2019) train the base model with noise of the sigma they certify")]
        if abs(p.trained_sigma - p.sigma) > 1e-9:
            return [(f"the base model was trained with Gaussian noise of sigma={p.trained_sigma} but is smoothed with "
                     f"sigma={p.sigma}: certificates hold, accuracy and radii are usually best at the training sigma")]
        return []


@hookimpl
def register_defenses(register):
    register(RandomizedSmoothing)
