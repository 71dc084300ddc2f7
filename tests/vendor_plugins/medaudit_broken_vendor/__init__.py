"""A vendor plugin whose import fails: medaudit must report it and carry on."""

raise ImportError("medaudit_broken_vendor needs a library that is not installed")
