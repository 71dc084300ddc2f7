"""Detect-then-route: detect-then-route.

Inputs a detector defense flags go to a robust model, the others to the audited model
(Hu, Wen & Fang 2023, Discussion). Nothing is rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medaudit import hookimpl
from medaudit.core.components import AttackContext, Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.models import prepare_for_audit
from medaudit.plugins.defenses import detectors, trained
from medaudit.plugins.defenses._common import fingerprint

#: The built-in defenses a route may name whose fitted state it keeps (by name); any other
#: part is applied again on restore (through the context, so :meth:`prepare` must run first).
_STATEFUL = {cls.name: cls for cls in (detectors.Mahalanobis, detectors.KdBu, detectors.Lid, detectors.Uad,
                                       detectors.MedicalAegis, trained.PgdAt, trained.Trades, trained.Ssat)}


class DefenseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A registered defense.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params.")


class RouteParams(Params):
    detector: DefenseSpec = Field(description="A detector defense (e.g. mahalanobis) that decides the route.")
    robust: DefenseSpec = Field(description="The defense whose model takes the flagged inputs (e.g. pgd-at).")


class DetectThenRoute(Defense):
    """Detect-then-route, the survey's proposal (Hu, Wen & Fang 2023, Discussion): inputs a
    detector flags go to an adversarially trained model, the others to the audited model.
    Nothing is rejected; the report gives the composite's clean and robust accuracy. The
    adaptive attack differentiates a soft routing (:class:`SoftRoutedView`)."""

    name = "detect-then-route"
    Params = RouteParams
    tasks = frozenset({Task.CLASSIFICATION})
    adaptive = ("BPDA through the routing: the exact routed outputs forward, the backward pass of "
                "(1 - w) softmax(standard) + w softmax(robust), w = sigmoid((score - threshold) / scale).")

    def __init__(self, params=None):
        super().__init__(params)
        #: The parts of each route built here, by its fingerprint, for :meth:`export_state`.
        self._parts: dict[str, tuple[LoadedModel, LoadedModel]] = {}

    def prepare(self, context: AttackContext) -> None:
        self.context = context

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        from medaudit.core.adaptive import DetectorScore

        p = self.params
        guarded = self.context.apply_defense(p.detector.name, p.detector.params)
        if not isinstance(guarded.screen, DetectorScore):
            raise ValueError(f"detector: {p.detector.name!r} is not a detector defense")
        robust = self.context.apply_defense(p.robust.name, p.robust.params)
        return self._route(model, guarded, robust)

    def export_state(self, defended: LoadedModel) -> dict[str, Any]:
        """The detector's and the robust model's states (for the built-in defenses among
        :data:`_STATEFUL`; None for a part applied again on restore)."""
        guarded, robust = self._parts[defended.fingerprint]
        return {"detector": self._part_state(self.params.detector, guarded),
                "robust": self._part_state(self.params.robust, robust)}

    def restore(self, model: LoadedModel, data: LoadedData, state: dict[str, Any]) -> LoadedModel:
        p = self.params
        guarded = self._restore_part(p.detector, model, data, state["detector"])
        robust = self._restore_part(p.robust, model, data, state["robust"])
        return self._route(model, guarded, robust)

    @staticmethod
    def _part_state(ref: DefenseSpec, part: LoadedModel) -> dict[str, Any] | None:
        cls = _STATEFUL.get(ref.name)
        return None if cls is None else cls(cls.Params.model_validate(ref.params)).export_state(part)

    def _restore_part(self, ref: DefenseSpec, model: LoadedModel, data: LoadedData, state) -> LoadedModel:
        if state is None:
            return self.context.apply_defense(ref.name, ref.params)
        cls = _STATEFUL[ref.name]
        return cls(cls.Params.model_validate(ref.params)).restore(model, data, state)

    def _route(self, model: LoadedModel, guarded: LoadedModel, robust: LoadedModel) -> LoadedModel:
        from medaudit.core.adaptive import RoutedModel, SoftRoutedView

        p = self.params
        routed = RoutedModel(model.module, robust.module, guarded.screen)
        defended = dataclasses.replace(
            model,
            module=prepare_for_audit(routed),
            adaptive_module=prepare_for_audit(SoftRoutedView(routed)),
            fingerprint=fingerprint(self, model, parts=(guarded.fingerprint, robust.fingerprint)),
            description=f"{p.detector.name} routes flagged inputs to {robust.description}",
            source={**model.source, "training": {"detector": guarded.source.get("training"),
                                                 "robust": robust.source.get("training")}},
        )
        self._parts[defended.fingerprint] = (guarded, robust)
        return defended


@hookimpl
def register_defenses(register):
    register(DetectThenRoute)
