"""The built-in plugins, one sub-package per kind of component.

Each module registers its components through the same hooks a vendor plugin uses
(:mod:`medaudit.core.hookspecs`); the first line of its docstring names them. Modules whose
name starts with ``_`` are helper libraries of their kind and register nothing. A module
here imports only ``medaudit``, ``medaudit.core`` and modules of its own kind.
"""
