"""medaudit-acme: an example medaudit plugin with the contrast-shift attack and the unchanged_share metric.

medaudit finds this module through the ``medaudit`` entry point in pyproject.toml and calls
the hooks below; each hands its component classes to ``register``.
"""

from medaudit import hookimpl
from medaudit_acme.attacks import ContrastShift
from medaudit_acme.metrics import UnchangedShare

__all__ = ["ContrastShift", "UnchangedShare"]


@hookimpl
def register_attacks(register):
    register(ContrastShift)


@hookimpl
def register_metrics(register):
    register(UnchangedShare)
