"""A job: one (defense, attack, epsilon) unit of an audit, and the labels jobs use.

Data every layer reads (the runner writes records per job, results group them, report
sections name adaptive attacks), so it lives in core; :mod:`medaudit.audits.plan` makes
the list of jobs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from medaudit.core.components import Facet
from medaudit.core.spec import epsilon_label, level_label

CLEAN = "clean"
#: The view of a defended model every attack gets: the deployed system as it is.
NAIVE = "naive"


def view_label(attack_label: str, view: str) -> str:
    """How results and the report name an attack run against a view: ``pgd``, ``pgd@adaptive``.
    Built once by the planner; nothing parses it back (jobs carry ``spec_attack`` and ``view``)."""
    return attack_label if view == NAIVE else f"{attack_label}@{view}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work whose per-sample records are written to ``records/<id>.jsonl``.

    A ``clean`` job evaluates a (defended) model on unperturbed data; attack jobs attack
    only the samples that model classifies correctly (the others are already errors).
    """

    id: str
    defense: str
    attack: str  #: display label (:func:`view_label`: ``pgd``, ``pgd@adaptive``), or ``clean``
    attack_name: str | None
    epsilon: float
    config: dict
    #: The defended model's view the attack differentiates: ``naive`` (the model as deployed)
    #: or one of the defense's :attr:`~medaudit.core.components.Defense.views` (BPDA, EOT...).
    view: str = NAIVE
    #: The attack's label in the spec (the same for every view); ``clean`` for a clean job.
    spec_attack: str = ""
    #: The name of the attack's own budget (:class:`~medaudit.core.components.Budget`) when
    #: no norm bounds it; ``epsilon`` is then a level of that budget. Empty: the threat norm.
    budget: str = ""

    def __post_init__(self) -> None:
        if not self.spec_attack:
            object.__setattr__(self, "spec_attack", self.attack)

    @property
    def adaptive(self) -> bool:
        """Does the job attack a view other than the deployed system itself?"""
        return self.view != NAIVE

    @property
    def is_clean(self) -> bool:
        return self.attack == CLEAN

    @property
    def epsilon_label(self) -> str:
        """The budget as :func:`epsilon_label` writes it in the job's norm (a clean job's is
        0), or as :func:`level_label` does for an attack sized by its own budget."""
        if self.is_clean:
            return "0"
        return level_label(self.epsilon, self.budget) if self.budget else epsilon_label(self.epsilon, self.config["norm"])

    def title(self) -> str:
        if self.is_clean:
            return f"{self.defense}: clean"
        return f"{self.defense}: {self.attack} " + (self.epsilon_label if self.budget else f"eps={self.epsilon_label}")


class Records(list):
    """A job's records (one dict per case) and the facets (:class:`Facet`) they declare:
    readers ask for a facet, never for the presence of a key."""

    def __init__(self, rows: Iterable[dict] = (), facets: Iterable[Facet] = ()):
        super().__init__(rows)
        self.facets: frozenset[Facet] = frozenset(Facet(f) for f in facets)
