"""ART bridge: art.

Run any evasion attack of the Adversarial Robustness Toolbox.

Breadth, not speed: ART takes and returns numpy arrays, so every call leaves the device.
What that costs depends on the attack. ART's PGD runs its steps in torch through the
``PyTorchClassifier`` wrapper and costs about as much as the native one (1.04x on the CPU,
``benchmarks/attacks.py``); attacks ART implements in numpy also move every step to the
host and back, so they are slower still, more so on a GPU. Use the native attacks for the
hot path.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Attack, AttackFamily, Norm, Params
from medaudit.core.lazy import np, torch
from medaudit.core.perturbation import project

#: ART's names for our norms.
ART_NORMS = {Norm.LINF: math.inf, Norm.L2: 2}


def art_evasion_classes() -> dict[str, type]:
    import art.attacks.evasion as evasion
    from art.attacks.attack import EvasionAttack

    return {n: c for n, c in inspect.getmembers(evasion, inspect.isclass) if issubclass(c, EvasionAttack)}


class ARTParams(Params):
    attack: str = Field(description="Class name in art.attacks.evasion, e.g. CarliniL2Method or DeepFool.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the ART attack; 'eps' and 'norm' are filled in from the threat model "
        "when the attack takes them.",
    )

    @field_validator("attack")
    @classmethod
    def _known(cls, value: str) -> str:
        classes = art_evasion_classes()
        if value not in classes:
            import difflib

            close = difflib.get_close_matches(value, classes, n=1)
            raise ValueError(f"art.attacks.evasion has no attack {value!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        return value

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict, info) -> dict:
        name = info.data.get("attack")
        if name is None:
            return value
        allowed = set(art_evasion_classes()[name].attack_params)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{name} takes no parameter {', '.join(unknown)} (it takes: {', '.join(sorted(allowed))})")
        return value


class ARTAttack(Attack):
    """Any ART evasion attack by class name, through numpy (for breadth; see the module's note on cost).

    Adversarial Robustness Toolbox, https://github.com/Trusted-AI/adversarial-robustness-toolbox.
    The model is wrapped in ART's ``PyTorchClassifier`` with clip values (0, 1). When the
    ART attack takes ``eps``/``norm`` they come from the threat model; the result is then
    projected onto the threat model's eps-ball in any case, so unbounded attacks (C&W,
    DeepFool) are judged within the audited budget. Labels are passed to ART, so the attack
    is untargeted against the true class. Classification only; input shape as the data.
    Norms: L-inf and L2 (as far as the chosen ART attack supports them).
    """

    name = "art"
    family = AttackFamily.OTHER
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2, 3})
    Params = ARTParams

    def perturb(self, model, x, y, *, eps, norm, generator):
        if eps == 0:
            return x.clone()
        from art.estimators.classification import PyTorchClassifier

        p: ARTParams = self.params
        with torch.no_grad():
            nb_classes = model(x[:1]).shape[1]
        classifier = PyTorchClassifier(
            model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=nb_classes,
            clip_values=(0.0, 1.0), device_type="gpu" if x.device.type == "cuda" else "cpu",
        )
        cls = art_evasion_classes()[p.attack]
        kwargs = dict(p.params)
        if "eps" in cls.attack_params:
            kwargs.setdefault("eps", eps)
        if "norm" in cls.attack_params:
            kwargs.setdefault("norm", ART_NORMS[norm])
        if "verbose" in cls.attack_params:
            kwargs.setdefault("verbose", False)
        # ART draws its randomness from numpy's global generator: seed it from ours.
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
        x_adv = cls(classifier, **kwargs).generate(x.detach().cpu().numpy(), y=y.detach().cpu().numpy())
        x_adv = torch.as_tensor(x_adv, dtype=x.dtype, device=x.device)
        return project(x_adv, x, eps, norm)


@hookimpl
def register_attacks(register):
    register(ARTAttack)
