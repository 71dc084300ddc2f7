"""What the run needs to know about the evaluation set, from one streaming pass.

The checks before the jobs (does every label or mask value fit the model's classes, do
the masks match the images) and the numbers the results report (per-channel intensity
statistics, cases per class, cases in which each mask class occurs) are all computed in a
single pass over :meth:`LoadedData.batches`, so a data set larger than memory is read
once and never held whole.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from medaudit.core.components import LoadedData, LoadedModel, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import torch


@dataclasses.dataclass
class DataSummary:
    """The result of :func:`summarise`."""

    n: int
    #: ``(C, H, W)`` or ``(C, D, H, W)``.
    image_shape: tuple[int, ...]
    #: Per channel: min, max, mean, std (unbiased) of the pixel-space images, rounded to 6 decimals.
    intensity: dict[str, list[float]]
    #: Classification: number of cases per class index (every index that occurs).
    label_counts: dict[int, int]
    #: Segmentation: per class ``0 .. num_classes - 1``, the number of cases in which it occurs.
    mask_presence: list[int] | None = None
    #: Segmentation: the shape of the first case's mask, for the mismatch message.
    mask_shape: tuple[int, ...] | None = None
    #: The first case (index, offending value) whose truth lies outside ``[0, num_classes)``.
    bad_truth: tuple[int, int] | None = None


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in
    float64 (Chan et al.'s parallel update), so the result does not depend on batching."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None
        self.min = self.max = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1)  # C x (pixels of the batch)
        lo, hi = flat.amin(1), flat.amax(1)
        flat = flat.double()
        n = flat.shape[1]
        mean = flat.mean(1)
        m2 = ((flat - mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2, self.min, self.max = n, mean, m2, lo, hi
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total
        self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    def stats(self) -> dict[str, list[float]]:
        std = (self.m2 / (self.count - 1)).sqrt() if self.count > 1 else torch.full_like(self.m2, float("nan"))
        return {name: [round(float(v), 6) for v in values.tolist()] for name, values in (
            ("min", self.min.float()), ("max", self.max.float()), ("mean", self.mean), ("std", std),
        )}


def summarise(data: LoadedData, task: Task, num_classes: int, batch_size: int = 64, workers: int = 0) -> DataSummary:
    """Read the evaluation set once and return its :class:`DataSummary`. ``num_classes`` is
    the model's (the range a label or mask value must lie in)."""
    task = Task(task)
    moments = _Moments()
    presence = torch.zeros(num_classes, dtype=torch.long) if task is Task.SEGMENTATION else None
    mask_shape, bad = None, None
    if task is Task.SEGMENTATION and not data.has_masks:
        raise DataError("segmentation needs masks, and the dataset has none")
    if len(data):
        for start, x, truth in data.batches(0, len(data), batch_size, workers, task=task):
            moments.add(x)
            if task is not Task.SEGMENTATION:
                continue
            if mask_shape is None:
                mask_shape = tuple(truth.shape[1:])
            if tuple(truth.shape[1:]) != tuple(x.shape[2:]) or len(truth) != len(x):
                mask_shape = tuple(truth.shape[1:])
                break
            flat = truth.flatten(1)
            out = (flat < 0) | (flat >= num_classes)
            rows = out.any(1)
            if bad is None and bool(rows.any()):
                i = int(rows.nonzero()[0, 0])
                bad = (start + i, int(flat[i][out[i]][0]))
            present = torch.stack([(flat == c).any(1) for c in range(num_classes)], 1)
            presence += present.sum(0)
    labels = data.labels
    if task is not Task.SEGMENTATION:
        out = (labels < 0) | (labels >= num_classes)
        if bool(out.any()):
            i = int(out.nonzero()[0, 0])
            bad = (i, int(labels[i]))
    return DataSummary(
        n=len(data),
        image_shape=tuple(data.image_shape),
        intensity=moments.stats() if moments.mean is not None else {},
        label_counts=dict(sorted(Counter(labels.tolist()).items())),
        mask_presence=presence.tolist() if presence is not None else None,
        mask_shape=mask_shape,
        bad_truth=bad,
    )


def check_data_fits(data: LoadedData, model: LoadedModel, task: Task, summary: DataSummary) -> None:
    """Refuse data the model cannot be audited on (channels, mask shape, label range), with
    the messages of the in-memory check this replaces. An empty set is the caller's to refuse."""
    channels = summary.image_shape[0]
    if channels not in (1, model.in_channels):
        raise DataError(f"images have {channels} channels but the model takes {model.in_channels}")
    limit = model.num_classes
    if Task(task) is Task.SEGMENTATION:
        if not data.has_masks:
            raise DataError("segmentation needs masks, and the dataset has none")
        if summary.mask_shape is not None and summary.mask_shape != tuple(summary.image_shape[1:]):
            raise DataError(f"masks of shape {(summary.n, *summary.mask_shape)} do not match images of shape "
                            f"{(summary.n, *summary.image_shape)}")
    if summary.bad_truth is not None:
        i, value = summary.bad_truth
        raise DataError(f"case {data.case_ids[i]}: label {value} is outside the model's {limit} classes")


def class_summary(data: LoadedData, task: Task, num_classes: int, summary: DataSummary) -> dict[str, Any]:
    """The class part of results.json's ``data`` section: class names and counts (cases
    per label; segmentation: cases in which each class occurs, and the spacing)."""
    if Task(task) is Task.SEGMENTATION:
        k = num_classes
        names = data.mask_class_names if data.mask_class_names and len(data.mask_class_names) == k else [f"class {i}" for i in range(k)]
        return {
            "class_names": names,
            "class_counts": {f"cases with {n}": v for n, v in zip(names, summary.mask_presence or [0] * k)},
            "spacing": list(data.spacing) if data.spacing else None,
        }
    return {
        "class_names": data.class_names,
        "class_counts": {
            data.class_names[k] if k < len(data.class_names) else str(k): v for k, v in summary.label_counts.items()
        },
    }
