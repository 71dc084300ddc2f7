"""The corruptions' severity scale: levels, the SSIM band each aims at, the calibrated table.

Kept apart from the attacks so that ``benchmarks/calibrate_corruptions.py`` can write the
table the attacks are built from.
"""

from __future__ import annotations

import json
from importlib import resources

#: The severities of every corruption, mildest first.
SEVERITIES = (1.0, 2.0, 3.0, 4.0, 5.0)
#: The mean SSIM against the clean image that each severity aims at on the calibration images.
TARGET_SSIM = (0.9, 0.8, 0.7, 0.6, 0.5)
#: The calibrated table: parameters per severity, the SSIM and PSNR they reach, how it was made.
SEVERITY_FILE = "corruption_severities.json"


def severity_table() -> dict:
    """The calibrated severities (written by ``benchmarks/calibrate_corruptions.py --write``)."""
    return json.loads(resources.files(__package__).joinpath(SEVERITY_FILE).read_text(encoding="utf-8"))
