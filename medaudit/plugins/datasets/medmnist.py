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

import math
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import np, torch
from medaudit.core.models import file_sha256
from medaudit.core.privacy import pseudonym, pseudonym_key
from medaudit.plugins.datasets._files import check_class_names, fingerprint_of

SPLITS = ("train", "val", "test")
#: Cases per chunk of the load pass over the images.
CHUNK = 1024


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


def _layout(arr: np.ndarray, key: str, name: str, dataset: str) -> str:
    """The layout of an images array in words; its shape and data type are checked."""
    if arr.ndim == 3:
        layout = "greyscale 2D"
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        layout = "greyscale 2D" if arr.shape[-1] == 1 else "RGB 2D"
    elif arr.ndim == 4:
        layout = "3D"
    else:
        raise DataError(
            f"{dataset}: {key} of {name} has shape {tuple(arr.shape)}; expected N x H x W, N x H x W x 3 or "
            "N x D x H x W"
        )
    if arr.dtype not in (np.uint8, np.uint16) and arr.dtype.kind != "f":
        raise DataError(f"{dataset}: {key} of {name} has data type {arr.dtype}; expected uint8, uint16 or float")
    return layout


def _unit(values: np.ndarray) -> np.ndarray:
    """Stored values as float32 in [0, 1]: uint8 / 255, uint16 / 65535, float as is (checked at load)."""
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    if values.dtype == np.uint16:
        return values.astype(np.float32) / 65535.0
    return values.astype(np.float32)


def _case_image(stored: np.ndarray) -> torch.Tensor:
    """One case of the stored array (``H x W``, ``H x W x C`` or ``D x H x W``) as ``C x H x W``
    or ``1 x D x H x W`` float32 in [0, 1]."""
    if stored.ndim == 3 and stored.shape[-1] in (1, 3):
        stored = stored.transpose(2, 0, 1)
    else:
        stored = stored[None]
    return torch.from_numpy(np.ascontiguousarray(_unit(stored))).clamp_(0.0, 1.0)


def _value_range(arr: np.ndarray, key: str, name: str, dataset: str) -> tuple[float, float]:
    """The range of the cases in [0, 1], read in chunks (a memory-mapped split is never copied
    whole); NaN, Inf and float values outside [0, 1] are refused."""
    low, high = np.inf, -np.inf
    for start in range(0, len(arr), CHUNK):
        chunk = np.asarray(arr[start : start + CHUNK])
        if not chunk.size:
            continue
        if chunk.dtype.kind == "f":
            if not np.isfinite(chunk).all():
                raise DataError(f"{dataset}: {key} of {name} contains NaN or Inf values")
            if chunk.min() < 0 or chunk.max() > 1:
                raise DataError(f"{dataset}: {key} of {name} has float values outside [0, 1]")
        low, high = min(low, chunk.min()), max(high, chunk.max())
    if low > high:
        return math.nan, math.nan
    # the conversion is monotone, so the converted extremes are the extremes of the converted cases
    ends = np.clip(_unit(np.asarray([low, high], dtype=arr.dtype)), 0.0, 1.0)
    return float(ends[0]), float(ends[1])


def _stored_member(path: Path, key: str) -> tuple[int, str, tuple[int, ...], bool] | None:
    """Where an uncompressed ``.npz`` member's array lies in the file, for ``np.memmap``:
    (offset, dtype, shape, Fortran order); None when it is compressed (no way to map it)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with archive.open(info) as member:  # read to the end: a damaged member fails its CRC here
            while member.read(1 << 24):
                pass
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            return None
        return f.tell(), dtype.str, tuple(shape), fortran


class NpzCases:
    """The cases of one MedMNIST split, converted to float32 one case at a time. An uncompressed
    member is memory-mapped (opened on first read in each process, so the object pickles to
    DataLoader workers as its path and layout); a compressed one is held as its stored array
    (uint8: a quarter of the float32 set)."""

    def __init__(self, path: Path, labels: torch.Tensor, stored: np.ndarray | None = None, member=None, stamp=None):
        self.path, self.labels, self.stored, self.member, self.stamp = path, labels, stored, member, stamp
        self._map: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.labels)

    def array(self) -> np.ndarray:
        if self.stored is not None:
            return self.stored
        if self._map is None:
            stat = self.path.stat()
            if (stat.st_size, stat.st_mtime_ns) != self.stamp:
                raise DataError(f"medmnist: {self.path.name} changed since the data set was loaded; load it again")
            offset, dtype, shape, fortran = self.member
            self._map = np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape,
                                  order="F" if fortran else "C")
        return self._map

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {"image": _case_image(np.asarray(self.array()[i])), "label": self.labels[i]}


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
            try:
                member = _stored_member(p.path, image_key)
            except Exception as exc:  # zipfile and numpy raise many types for damaged members
                raise DataError(f"{ds}: cannot read array {image_key} of {name}: {type(exc).__name__}: {exc}") from None
            if member is not None:  # mapped, not read: a split of any size is never held whole
                stat = p.path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                raw_images = NpzCases(p.path, torch.zeros(0), member=member, stamp=stamp).array()
            else:
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
        layout = _layout(raw_images, image_key, name, ds)
        value_range = _value_range(raw_images[:n], image_key, name, ds)
        labels = labels[:n]
        if p.classes is not None:
            if largest >= len(p.classes):
                raise DataError(f"{ds}: {name} holds label {largest} but classes lists only {len(p.classes)} names")
            classes = list(p.classes)
        else:
            classes = [f"class{i}" for i in range(largest + 1)]

        labels_t = torch.from_numpy(labels)
        if member is not None:
            cases = NpzCases(p.path, labels_t, member=member, stamp=stamp)
        else:  # a compressed member cannot be mapped: keep the stored split (not a float32 copy)
            cases = NpzCases(p.path, labels_t, stored=raw_images[:n].copy() if n < total else raw_images)
        image_shape = tuple(cases[0]["image"].shape)
        key = pseudonym_key([digest])
        per_class = Counter(labels.tolist())
        shape = " x ".join(str(s) for s in image_shape)
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
                f"intensity range [{value_range[0]:.3g}, {value_range[1]:.3g}]",
            ]
        )
        return LoadedData(
            images=None,
            cases=cases,
            image_shape=image_shape,
            labels=labels_t,
            case_ids=[pseudonym(key, f"{p.split}/{i}") for i in range(n)],
            class_names=classes,
            fingerprint=fingerprint_of([(name, digest)], p.model_dump(mode="json", exclude={"path"})),
            description=description,
        )


@hookimpl
def register_datasets(register):
    register(MedMnist)
