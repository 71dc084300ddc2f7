"""Tiny models, data and records to test components against, built in seconds on a CPU.

The models are the examples' demo models (:mod:`medaudit.plugins.models.demo`): trained on
phantom slices on first use and cached under medaudit's cache folder (``$MEDAUDIT_CACHE_DIR``
to keep them elsewhere), so later sessions only read the checkpoint.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from medaudit.core.components import Facet, Task

if TYPE_CHECKING:
    from medaudit.core.components import LoadedData, LoadedModel
    from medaudit.core.jobs import Records

#: The classification demo model: a 2-class timm classifier (about ten seconds of training).
DEMO = {"image_size": 64, "train_size": 640, "epochs": 10, "seed": 0}
#: The segmentation demo U-Nets: 2D (smp, 5 phantom classes, 64 px) and 3D (MONAI, 32 px x 16 slices).
DEMO_UNET_2D = {"dims": 2, "image_size": 64, "train_size": 512, "steps": 200, "seed": 0}
DEMO_UNET_3D = {"dims": 3, "image_size": 32, "depth": 16, "train_size": 64, "steps": 100, "seed": 0}


def demo_model() -> LoadedModel:
    """The demo classifier (nodule vs normal on 64 px phantom slices, one grey channel)."""
    from medaudit.plugins.models.demo import DemoModel, DemoParams

    return DemoModel(DemoParams(**DEMO)).load(Task.CLASSIFICATION)


def demo_unet(config: dict | None = None) -> LoadedModel:
    """A demo U-Net (default: the 2D one, :data:`DEMO_UNET_2D`)."""
    from medaudit.plugins.models.demo import DemoUNet, DemoUNetParams

    return DemoUNet(DemoUNetParams(**(config or DEMO_UNET_2D))).load(Task.SEGMENTATION)


def phantom_data(n: int = 96, size: int = 64, seed: int = 0) -> LoadedData:
    """``n`` phantom slices with labels (normal, nodule) and 5-class structure masks."""
    from medaudit.plugins.datasets.phantom import Phantom, PhantomParams

    return Phantom(PhantomParams(n=n, size=size, seed=seed)).load()


#: The facets of a classification attack job's records on an undefended model.
ATTACK_FACETS = frozenset({Facet.CLASSIFICATION, Facet.PERTURBATION, Facet.FINITE})


def example_records(
    n: int = 32, seed: int = 0, num_classes: int = 2, facets: frozenset[Facet] = ATTACK_FACETS,
) -> Records:
    """Records of a classification attack job as the results read them: every field a record
    of the run has (:data:`medaudit.audits.records.FIELDS`), random but seeded, written and
    read back through the run's own record files, so the derived ``clean_correct`` and
    ``adv_correct`` are the runner's. About a fifth of the cases are misclassified clean and
    so not attacked; the attack flips about half of the others."""
    from medaudit.audits.records import RecordWriter, read_records

    draw = random.Random(seed)
    rows = []
    for i in range(n):
        label = draw.randrange(num_classes)
        clean_pred = label if draw.random() < 0.8 else (label + 1) % num_classes
        attacked = clean_pred == label
        adv_pred = (label + 1) % num_classes if attacked and draw.random() < 0.5 else clean_pred
        linf = draw.uniform(0.5, 1.0) * 4 / 255 if attacked else 0.0
        rows.append({
            "case": f"case-{i:04d}", "label": label, "clean_pred": clean_pred, "adv_pred": adv_pred,
            "attacked": attacked, "linf": linf, "l2": linf * draw.uniform(8, 32), "in_range": True,
            "clean_finite": True, "adv_finite": True,
        })
    with tempfile.TemporaryDirectory() as folder:
        writer = RecordWriter(Path(folder), "example")
        writer.write(rows)
        writer.commit(facets)
        return read_records(Path(folder), "example")
