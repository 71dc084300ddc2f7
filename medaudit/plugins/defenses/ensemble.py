"""Ensemble: ensemble.

The average of several models' softmax probabilities (Paul et al. 2020; methods.md 11.5).
Differentiable, so the attacks see its exact gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medaudit import hookimpl
from medaudit.core.components import AttackContext, Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.models import prepare_for_audit
from medaudit.plugins.defenses._common import fingerprint


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loader: str = Field(description="A registered model loader.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params.")


class EnsembleParams(Params):
    members: list[ModelSpec] = Field(min_length=1, description="The other members (e.g. the same network from other seeds).")
    include_audited: bool = Field(True, description="The audited model is a member too.")


class Ensemble(Defense):
    """Ensemble of Paul et al. (2020; methods.md 11.5): the average of several models'
    softmax probabilities. Differentiable, so the attacks see its exact gradient. Train the
    members yourself (Paul et al.: several random initialisations, adversarial images in
    the training set) and list their checkpoints."""

    name = "ensemble"
    Params = EnsembleParams
    tasks = frozenset({Task.CLASSIFICATION})

    def prepare(self, context: AttackContext) -> None:
        self.members = [context.load_model(m.loader, m.params) for m in self.params.members]

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        from medaudit.plugins.defenses._modules import EnsembleModule

        members = ([model] if self.params.include_audited else []) + self.members
        for i, m in enumerate(self.members):
            if m.num_classes != model.num_classes or m.task is not model.task:
                raise ValueError(f"members[{i}] gives {m.num_classes} {m.task.value} classes; the audited model "
                                 f"{model.num_classes} {model.task.value} classes")
        return dataclasses.replace(
            model,
            module=prepare_for_audit(EnsembleModule([m.module for m in members])),
            fingerprint=fingerprint(self, model, parts=tuple(m.fingerprint for m in members)),
            description=f"ensemble of {len(members)} models (mean of softmax probabilities)",
            source={**model.source, "members": [m.description for m in members]},
            adaptive_module=None,
        )


@hookimpl
def register_defenses(register):
    register(Ensemble)


def __getattr__(name: str):
    """Modules moved to :mod:`._modules` (defining them needs torch), still importable from here."""
    if name in {"EnsembleModule"}:
        from medaudit.plugins.defenses import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
