"""Per-sample records: one JSON line per sample per job, written atomically per job.

A job's records are written to ``records/<id>.jsonl.partial`` and renamed to
``records/<id>.jsonl`` when the job is complete, so a file without the suffix always holds
a finished job and an interrupted run resumes from the first unfinished job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from medaudit.audits.rundir import atomic_file, write_atomic
from medaudit.core.components import Facet
from medaudit.core.jobs import Records

#: Fields of a classification record. Minimum-norm attacks add ``min_norm``: the size of
#: the smallest fooling perturbation found for the sample (None when none was found).
#: ``clean_finite``/``adv_finite`` (in segmentation records too) say whether every output of
#: the model was finite (no NaN or Inf) on the clean input and on the input under attack.
#: Under ``runtime.strategy: verdict``, ``carried`` names the earlier job whose adversarial a
#: case took over instead of being attacked again (None: attacked here, or not at all).
FIELDS = ("case", "label", "clean_pred", "adv_pred", "attacked", "linf", "l2", "in_range", "clean_finite", "adv_finite")
#: Fields of a segmentation record: per-class lists (index = class) of Dice, IoU and HD95,
#: clean and under attack, and per-case pixel accuracy. Targeted attacks add
#: ``target_dice`` (per class, prediction vs the attacker's target), ``target_pixel_accuracy``,
#: ``target_changed`` (pixels where the target differs from the truth) and ``target_hit``
#: (the share of those the prediction takes the target's label on; None when there are none).
DENSE_FIELDS = (
    "case", "attacked", "linf", "l2", "in_range", "clean_dice", "clean_iou", "clean_hd95", "clean_pixel_accuracy",
    "adv_dice", "adv_iou", "adv_hd95", "adv_pixel_accuracy", "clean_finite", "adv_finite",
)
#: Cases whose images and predictions each job keeps for the report's example figures.
EXAMPLE_CASES = 4
#: Cases (the first in the data set) whose penultimate features each classification job keeps.
FEATURE_CASES = 512


def record_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "records" / f"{job_id}.jsonl"


def meta_path(run_dir: Path, job_id: str) -> Path:
    """``records/<id>.meta.json``: the facets (:class:`Facet`) the job's records hold."""
    return run_dir / "records" / f"{job_id}.meta.json"


def is_done(run_dir: Path, job_id: str) -> bool:
    return record_path(run_dir, job_id).is_file()


class RecordWriter:
    """Appends records of one job; :meth:`commit` writes the facets of its records to
    ``<id>.meta.json`` and then makes the job count as done."""

    def __init__(self, run_dir: Path, job_id: str):
        self.job_id = job_id
        self.meta = meta_path(run_dir, job_id)
        self.final = record_path(run_dir, job_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self._file = open(self.partial, "w", encoding="utf-8")

    def write(self, rows: Iterable[dict]) -> None:
        self._file.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)

    def commit(self, facets: Iterable[Facet]) -> None:
        meta = {"job": self.job_id, "facets": sorted(Facet(f).value for f in facets)}
        write_atomic(self.meta, json.dumps(meta, indent=1) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.final)

    def discard(self) -> None:
        try:
            self._file.close()  # flushes, and fails again on a full disk
        finally:
            self.partial.unlink(missing_ok=True)


def read_facets(run_dir: Path, job_id: str, rows: list[dict]) -> frozenset[Facet]:
    """The facets ``<id>.meta.json`` declares. Records written before meta files existed
    declare none: their facets are read off the fields of their first record once."""
    path = meta_path(run_dir, job_id)
    if path.is_file():
        return frozenset(Facet(f) for f in json.loads(path.read_text(encoding="utf-8"))["facets"])
    first = rows[0] if rows else {}
    legacy = {Facet.CLASSIFICATION: "label", Facet.SEGMENTATION: "adv_dice", Facet.PERTURBATION: "attacked",
              Facet.FINITE: "clean_finite", Facet.REJECTION: "clean_rejected", Facet.DETECTION_SCORE: "clean_score", Facet.MINIMUM_NORM: "min_norm",
              Facet.TARGET: "target_dice", Facet.EXTRAS: "extras", Facet.COVARIATES: "covariates"}
    return frozenset(facet for facet, key in legacy.items() if key in first)


def read_records(run_dir: Path, job_id: str) -> Records:
    """Records of a finished job, with the facets they declare. Classification records get
    the derived ``clean_correct``/``adv_correct`` flags: a case whose outputs were not finite
    (facet FINITE) is an error, clean or under attack. Behind a rejecting defense (facet
    REJECTION, declared by the defense's :class:`~medaudit.core.components.Screen`) a
    rejected clean input is an error, and an input under attack survives if it is
    classified correctly or rejected (a clean job's records have no ``adv_rejected``; a
    case not attacked has None there)."""
    with open(record_path(run_dir, job_id), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    facets = read_facets(run_dir, job_id, rows)
    if Facet.CLASSIFICATION in facets:
        finite, rejection = Facet.FINITE in facets, Facet.REJECTION in facets
        for row in rows:
            row["clean_correct"] = (
                (not finite or row["clean_finite"]) and row["clean_pred"] == row["label"]
                and not (rejection and row["clean_rejected"])
            )
            row["adv_correct"] = row["clean_correct"] and (not finite or row["adv_finite"]) and (
                row["adv_pred"] == row["label"] or (rejection and bool(row.get("adv_rejected")))
            )
    return Records(rows, facets)


def has_nonfinite_output(row: dict) -> bool:
    """Did the model give a NaN or Inf output for this case, clean or under attack?"""
    return not (row.get("clean_finite", True) and row.get("adv_finite", True))


def examples_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "examples" / f"{job_id}.pt"


def save_examples(run_dir: Path, job_id: str, x, x_adv, truth, pred, target=None, clean_pred=None) -> None:
    """Keep the first cases of a job for the report's example figures.

    Segmentation (``truth`` holds label maps): the first channel of the image and of the
    adversarial image, the truth, the prediction under attack and the target, if any; a 3D
    case keeps the slice where its smallest structure is largest.

    Classification (``truth`` holds class indices): the images with all their channels,
    ``truth``, ``prediction`` (under attack) and ``clean_prediction``; a 3D case keeps its
    middle slice, and then ``volume_slice`` says which.
    """
    k = min(EXAMPLE_CASES, len(x))
    if truth.dim() == 1:
        keep = {"image": x[:k], "adversarial": x_adv[:k], "truth": truth[:k], "prediction": pred[:k]}
        if clean_pred is not None:
            keep["clean_prediction"] = clean_pred[:k]
        if x.dim() == 5:
            middle = x.shape[2] // 2
            keep["image"], keep["adversarial"] = keep["image"][:, :, middle], keep["adversarial"][:, :, middle]
            keep["volume_slice"] = torch.tensor(middle)
    else:
        keep = {"image": x[:k, 0], "adversarial": x_adv[:k, 0], "truth": truth[:k], "prediction": pred[:k]}
        if target is not None:
            keep["target"] = target[:k]
        if truth.dim() == 4:
            index = torch.stack([_telling_slice(t) for t in truth[:k]])
            keep = {name: v[torch.arange(k), index] for name, v in keep.items()}
    with atomic_file(examples_path(run_dir, job_id), "wb") as f:
        torch.save({name: v.detach().cpu().clone() for name, v in keep.items()}, f)


def _telling_slice(truth: torch.Tensor) -> torch.Tensor:
    """Index of the slice of a ``D x H x W`` label map showing most of its rarest class."""
    counts = torch.stack([torch.bincount(s.flatten(), minlength=int(truth.max()) + 1) for s in truth])
    total = counts.sum(0)
    present = (total > 0).nonzero().flatten()
    present = present[present > 0] if len(present) > 1 else present
    rarest = present[total[present].argmin()]
    return counts[:, rarest].argmax()


def load_examples(run_dir: Path, job_id: str) -> dict[str, torch.Tensor] | None:
    path = examples_path(run_dir, job_id)
    return torch.load(path, weights_only=True) if path.is_file() else None


def features_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "examples" / f"{job_id}.features.pt"


def save_features(run_dir: Path, job_id: str, positions: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep a classification job's penultimate features (float16, ``n x d``) with the data set
    positions and true labels of their cases."""
    with atomic_file(features_path(run_dir, job_id), "wb") as f:
        torch.save({"position": positions.cpu().clone(), "features": features.cpu().clone(), "truth": labels.cpu().clone()}, f)


def load_features(run_dir: Path, job_id: str) -> dict[str, torch.Tensor] | None:
    path = features_path(run_dir, job_id)
    return torch.load(path, weights_only=True) if path.is_file() else None
