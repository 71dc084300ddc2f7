"""medaudit: audit the adversarial robustness of medical image models.

Plugin authors need only ``from medaudit import hookimpl`` and the base classes in
:mod:`medaudit.core.components`.
"""

from medaudit.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
