"""Per-class rates of a classifier (one class against the rest), from classification records:
the counts behind sensitivity, specificity and the false-negative rate, clean or under
attack. The metrics and the results' direction-of-errors table both count here."""

from __future__ import annotations

from typing import Sequence


def answers(row: dict, c: int, side: str) -> bool:
    """Does the model (``clean`` or under attack, ``adv``) answer class ``c`` for this case?
    A NaN or Inf output and an input the defense rejects answer no class."""
    return (row[f"{side}_pred"] == c and row.get(f"{side}_finite", True) is not False
            and not row.get(f"{side}_rejected"))


def found(records: Sequence[dict], c: int, side: str) -> list[bool]:
    """Per case of class ``c``: found (sensitivity's successes). Under attack a case survives
    as the robust accuracy counts it (``adv_correct``: right, or rejected by a defense)."""
    return [r[f"{side}_correct"] for r in records if r["label"] == c]


def spared(records: Sequence[dict], c: int, side: str) -> list[bool]:
    """Per case of another class: not called ``c`` (specificity's successes)."""
    return [not answers(r, c, side) for r in records if r["label"] != c]
