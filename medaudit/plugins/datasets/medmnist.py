"""Datasets: medmnist.

One split of a MedMNIST ``.npz`` file (2D or 3D).

MedMNIST (medmnist.com) ships each of its data sets as one NumPy ``.npz`` archive with
the arrays ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``. This reads one split of a local copy; nothing is
downloaded (fetch the file with the ``medmnist`` package or from the project's site
first). The archive is opened with ``numpy.load(allow_pickle=False)``, so a file that
holds pickled objects is refused instead of run.

Images: ``N x H x W`` (greyscale 2D), ``N x H x W x 3`` (RGB 2D; ``N x H x W x 1`` counts
as greyscale) or ``N x D x H x W`` (the 3D sets; a 4-D array whose last axis is not 1 or
3 is read as a volume). uint8 values are scaled by 1/255, uint16 by 1/65535; float
arrays must already lie in [0, 1] (NaN and Inf are refused). Labels: ``N`` or ``N x 1``
class indices. ``N x K`` label arrays (ChestMNIST's 14 findings) are multi-label and
refused: this tool audits single-label classification.

Class names are the ``classes`` param, else ``class0..classK-1`` where K - 1 is the
largest label in any split of the file. MedMNIST is public research data without patient
identifiers, so no sensitive values are recorded; case ids are pseudonyms of
``split/index`` all the same, like every other dataset's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.models import file_sha256
from medaudit.core.privacy import pseudonym, pseudonym_key
from medaudit.plugins.datasets._files import check_class_names, fingerprint_of

SPLITS = ("train", "val", "test")


class MedMnistParams(Params):
    path: InputPath = Field(description="Local MedMNIST .npz file (e.g. pathmnist.npz); never downloaded.")
    split: Literal["train", "val", "test"] = Field("test", description="Which split to read: train, val or test.")
    classes: list[str] | None = Field(
        None,
        description="Class names in label order (0, 1, ...), e.g. from the data set's INFO['label']. Default: "
        "class0..classK-1 from the largest label in the file.",
    )
    max_cases: int | None = Field(None, ge=1, description="Read only the first cases of the split (in stored order).")

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        return check_class_names(value)


def _array(npz, key: str, name: str, dataset: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except Exception as exc:  # zipfile, zlib and numpy raise many types for damaged members
        raise DataError(f"{dataset}: cannot read array {key} of {name}: {type(exc).__name__}: {exc}") from None


def _label_vector(labels: np.ndarray, key: str, name: str, dataset: str) -> np.ndarray:
    """``N`` int64 class indices from an ``N`` or ``N x 1`` array."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        raise DataError(
            f"{dataset}: {key} of {name} is {labels.shape[0]} x {labels.shape[1]}: multi-label data (several labels "
            "per image, as in ChestMNIST) is unsupported; this tool audits single-label classification"
        )
    elif labels.ndim != 1:
        raise DataError(f"{dataset}: {key} of {name} has shape {tuple(labels.shape)}; expected N or N x 1 class indices")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DataError(f"{dataset}: {key} of {name} holds non-integer values; labels are class indices")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{dataset}: {key} of {name} has data type {labels.dtype}; labels are integer class indices")
    if labels.size and labels.min() < 0:
        raise DataError(f"{dataset}: {key} of {name} holds negative label {labels.min():g}")
    return labels.astype(np.int64)


def _images(arr: np.ndarray, key: str, name: str, dataset: str) -> tuple[np.ndarray, str]:
    """``N x C x H x W`` or ``N x 1 x D x H x W`` float32 in [0, 1], and the layout in words."""
    if arr.ndim == 3:
        arr, layout = arr[:, None], "greyscale 2D"
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr, layout = arr.transpose(0, 3, 1, 2), "greyscale 2D" if arr.shape[-1] == 1 else "RGB 2D"
    elif arr.ndim == 4:
        arr, layout = arr[:, None], "3D"
    else:
        raise DataError(
            f"{dataset}: {key} of {name} has shape {tuple(arr.shape)}; expected N x H x W, N x H x W x 3 or "
            "N x D x H x W"
        )
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{dataset}: {key} of {name} contains NaN or Inf values")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise DataError(f"{dataset}: {key} of {name} has float values outside [0, 1]")
        out = arr.astype(np.float32)
    else:
        raise DataError(f"{dataset}: {key} of {name} has data type {arr.dtype}; expected uint8, uint16 or float")
    return np.ascontiguousarray(out), layout


class MedMnist(Dataset):
    """One split (train, val or test) of a local MedMNIST .npz file, 2D or 3D; never downloads."""

    name = "medmnist"
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({2, 3})
    Params = MedMnistParams

    def load(self) -> LoadedData:
        p: MedMnistParams = self.params
        ds, name = self.name, p.path.name
        if not p.path.is_file():
            raise DataError(
                f"{ds}: file not found: {p.path} (this dataset never downloads: fetch the .npz with the medmnist "
                "package or from the MedMNIST site first)"
            )
        digest = file_sha256(p.path)
        try:
            npz = np.load(p.path, allow_pickle=False)
        except Exception as exc:  # zipfile, OSError, ValueError (pickled data), EOFError...
            raise DataError(
                f"{ds}: cannot read {name}: not a NumPy .npz archive, or a corrupt one ({type(exc).__name__})"
            ) from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{ds}: {name} holds a single array (.npy), not a MedMNIST .npz archive")
        with npz:
            keys = sorted(npz.files)
            image_key, label_key = f"{p.split}_images", f"{p.split}_labels"
            missing = [k for k in (image_key, label_key) if k not in keys]
            if missing:
                raise DataError(
                    f"{ds}: {name} has no {' or '.join(missing)} (keys: {', '.join(keys) or 'none'}); is it a "
                    "MedMNIST file?"
                )
            raw_images = _array(npz, image_key, name, ds)
            labels = _label_vector(_array(npz, label_key, name, ds), label_key, name, ds)
            split_sizes = {}
            largest = int(labels.max()) if labels.size else -1
            for split in SPLITS:  # the other splits' labels fix the number of classes
                key = f"{split}_labels"
                if key in keys and split != p.split:
                    other = _label_vector(_array(npz, key, name, ds), key, name, ds)
                    split_sizes[split] = len(other)
                    largest = max(largest, int(other.max()) if other.size else -1)
        if raw_images.ndim < 1 or len(raw_images) != len(labels):
            raise DataError(
                f"{ds}: {name} has {len(raw_images) if raw_images.ndim else 0} {p.split} images but {len(labels)} "
                f"{p.split} labels"
            )
        total = len(labels)
        if total == 0:
            raise DataError(f"{ds}: the {p.split} split of {name} is empty")
        split_sizes[p.split] = total
        n = total if p.max_cases is None else min(p.max_cases, total)
        images, layout = _images(raw_images[:n], image_key, name, ds)
        labels = labels[:n]
        if p.classes is not None:
            if largest >= len(p.classes):
                raise DataError(f"{ds}: {name} holds label {largest} but classes lists only {len(p.classes)} names")
            classes = list(p.classes)
        else:
            classes = [f"class{i}" for i in range(largest + 1)]

        images_t = torch.from_numpy(images).clamp_(0.0, 1.0)
        labels_t = torch.from_numpy(labels)
        key = pseudonym_key([digest])
        per_class = Counter(labels.tolist())
        shape = " x ".join(str(s) for s in images_t.shape[1:])
        description = "; ".join(
            [
                f"{ds}: {n} {p.split} images"
                + (f" (first {n} of {total})" if n < total else "")
                + f" in {len(classes)} classes ("
                + ", ".join(f"{cls}: {per_class[i]}" for i, cls in enumerate(classes))
                + ")",
                f"{shape} ({layout}, {'C x D x H x W' if layout == '3D' else 'C x H x W'})",
                f"stored as {raw_images.dtype}",
                "split sizes " + ", ".join(f"{s} {split_sizes[s]}" for s in SPLITS if s in split_sizes),
                f"intensity range [{float(images_t.min()):.3g}, {float(images_t.max()):.3g}]",
            ]
        )
        return LoadedData(
            images=images_t.contiguous(),
            labels=labels_t,
            case_ids=[pseudonym(key, f"{p.split}/{i}") for i in range(n)],
            class_names=classes,
            fingerprint=fingerprint_of([(name, digest)], p.model_dump(mode="json", exclude={"path"})),
            description=description,
        )


@hookimpl
def register_datasets(register):
    register(MedMnist)
