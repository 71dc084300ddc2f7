"""File helpers shared by the file-based datasets: listing, matching by key, class folders,
fingerprints, and reading 2D images and masks with Pillow.

Every file must lie inside its folder once symbolic links are resolved (:func:`inside`).
The file datasets are lazy: the load reads, hashes and checks every file and keeps no pixels;
each case is read again from its file when the audit asks for it (a file changed since the load
is refused), through the same decoding code, so it is bit for bit what the load checked.
Error messages name the file: they go to the user's own console only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from pydantic import Field, field_validator

from medaudit.core.components import InputPath, Params
from medaudit.core.errors import DataError
from medaudit.core.lazy import F, np, torch
from medaudit.core.privacy import leaked_values

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")

#: Integer image modes of Pillow read as 16-bit intensities (scaled by 65535).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def check_folder(path: Path, what: str, dataset: str) -> None:
    if not path.is_dir():
        raise DataError(f"{dataset}: {what} folder not found: {path}")


def inside(root: Path, path: Path, where: str) -> None:
    """Refuse ``path`` when, with its links resolved, it leaves ``root``: a link in a data
    folder (``images/root -> /``) must not let a spec or a CSV row read any file on the machine.
    ``where`` names the entry for the message (a CSV line, a file of the data set, a case)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{where} leads outside {root} (through a symbolic link); data files must lie inside their folder: copy "
            "the file in, or point the spec at a folder that holds it"
        )


def list_files(folder: Path, suffixes: tuple[str, ...], dataset: str) -> list[str]:
    """Names of the visible files in ``folder`` (not recursive) ending in one of ``suffixes``;
    each must lie inside ``folder`` once links are resolved (:func:`inside`)."""
    names = [
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.name.lower().endswith(suffixes) and not f.name.startswith(".")
    ]
    for name in names:
        inside(folder, folder / name, f"{dataset}: {name} in {folder}")
    return names


def match_by_key(
    primary: dict[str, str], secondary: dict[str, str], primary_what: str, secondary_what: str, dataset: str
) -> list[tuple[str, str]]:
    """Pair files by key (sorted); every primary file needs a partner."""
    pairs = []
    for key in sorted(primary):
        if key not in secondary:
            raise DataError(f"{dataset}: {primary_what} {primary[key]} has no {secondary_what} (expected one named {key}.*)")
        pairs.append((primary[key], secondary[key]))
    return pairs


def index_by_key(names: Iterable[str], key, what: str, dataset: str) -> dict[str, str]:
    """Map each file's key to its name; two files with one key are ambiguous."""
    index: dict[str, str] = {}
    for name in sorted(names):
        k = key(name)
        if k in index:
            raise DataError(f"{dataset}: {what}s {index[k]} and {name} have the same name; keep only one")
        index[k] = name
    return index


def fingerprint_of(file_hashes: list[tuple[str, str]], params: dict[str, Any]) -> str:
    """sha256 over sorted (relative name, file sha256) pairs and the params.

    The folder paths are left out of ``params`` by the callers: the same files give the
    same fingerprint wherever they are stored.
    """
    digest = hashlib.sha256()
    for name, file_hash in sorted(file_hashes):
        digest.update(name.encode("utf-8") + b"\0" + file_hash.encode() + b"\n")
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()


def label_map(values: np.ndarray, rel: str, dataset: str) -> np.ndarray:
    """Check that a label map holds non-negative integers; return it as int64."""
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise DataError(f"{dataset}: mask {rel} contains NaN or Inf values")
        if (values != np.round(values)).any():
            bad = values[values != np.round(values)].flat[0]
            raise DataError(f"{dataset}: mask {rel} has non-integer value {bad:g}; masks hold class indices")
    elif values.dtype.kind not in "iub":
        raise DataError(f"{dataset}: mask {rel} has unsupported data type {values.dtype}")
    if values.size and values.min() < 0:
        raise DataError(f"{dataset}: mask {rel} has negative value {values.min():g}; masks hold class indices")
    return values.astype(np.int64)


def mask_class_names(max_label: int, class_names: list[str] | None, dataset: str) -> list[str]:
    """The given class names (checked against the largest label) or ``class0..classK-1``."""
    if class_names is None:
        return [f"class{i}" for i in range(max_label + 1)]
    if max_label >= len(class_names):
        raise DataError(
            f"{dataset}: masks contain label {max_label} but class_names lists only {len(class_names)} classes"
        )
    return list(class_names)


def check_class_names(value: list[str] | None) -> list[str] | None:
    """Validator of a ``classes`` param: at least one name, distinct, none blank."""
    if value is not None:
        if not value:
            raise ValueError("classes must list at least one class")
        if len(set(value)) != len(value):
            raise ValueError("classes must be distinct")
        if any(not name.strip() for name in value):
            raise ValueError("class names must not be empty")
    return value


class ClassFolderParams(Params):
    """Params of the datasets that read one subfolder per class: ``path`` and ``classes``."""

    path: InputPath = Field(description="Root folder with one subfolder per class.")
    classes: list[str] | None = Field(
        None,
        description="Class subfolders in label order (0, 1, ...); other subfolders are ignored. Default: all "
        "subfolders, sorted by name.",
    )

    @field_validator("classes")
    @classmethod
    def _plain_names(cls, value: list[str] | None) -> list[str] | None:
        """Distinct plain folder names."""
        for name in check_class_names(value) or []:
            if name in (".", "..") or "/" in name or "\\" in name:
                raise ValueError(f"class {name!r} is not a folder name")
        return value


def class_folders(root: Path, classes: list[str] | None, dataset: str) -> tuple[list[str], int]:
    """The class subfolders of ``root`` in label order (``classes``, else all sorted by name)
    and how many subfolders are left out."""
    folders = sorted(f.name for f in root.iterdir() if f.is_dir() and not f.name.startswith("."))
    if classes is None:
        if not folders:
            raise DataError(f"{dataset}: no class subfolders in {root}; put each class's files in a subfolder")
        classes = folders
    missing = [c for c in classes if c not in folders]
    if missing:
        raise DataError(f"{dataset}: class folder {missing[0]!r} not found in {root}")
    for name in classes:
        inside(root, root / name, f"{dataset}: class folder {name!r}")
    return list(classes), len(folders) - len(classes)


def read_bytes(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def open_image(data: bytes, rel: str, what: str, dataset: str):
    """Decode one 2D image file's bytes with Pillow; a corrupt file or a multi-frame one is a DataError."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise DataError(f"{dataset}: cannot read {what} {rel}: {type(exc).__name__}: {exc}") from None
    if getattr(img, "n_frames", 1) > 1:
        raise DataError(f"{dataset}: {what} {rel} has {img.n_frames} frames; this dataset reads 2D images")
    return img


def image_array(img, rel: str, grayscale: bool, dataset: str) -> np.ndarray:
    """``C x H x W`` float32 in [0, 1]: 8-bit modes / 255, 16-bit modes / 65535, float as is (NaN, Inf
    and values outside [0, 1] refused)."""
    if img.mode in WIDE_MODES or img.mode == "F":
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise DataError(f"{dataset}: image {rel} contains NaN or Inf values")
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise DataError(f"{dataset}: float image {rel} has values outside [0, 1]")
            gray = arr.astype(np.float32)
        else:
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise DataError(f"{dataset}: image {rel} has values outside the 16-bit range")
            gray = arr.astype(np.float32) / 65535.0
        return gray[None] if grayscale else np.repeat(gray[None], 3, axis=0)
    try:
        img = img.convert("L" if grayscale else "RGB")
    except Exception as exc:
        raise DataError(f"{dataset}: cannot convert image {rel} (mode {img.mode}): {exc}") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if grayscale else arr.transpose(2, 0, 1)


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """``C x H x W`` to ``C x size x size``, bilinear and antialiased (unchanged when already that size)."""
    if tuple(x.shape[1:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def mask_array(img, rel: str, dataset: str) -> np.ndarray:
    """``H x W`` int64 class map; single-channel modes only (palette masks give their indices)."""
    if img.mode not in ("1", "L", "P", "F") + WIDE_MODES:
        raise DataError(
            f"{dataset}: mask {rel} has {len(img.getbands())} channels (mode {img.mode}); save masks as "
            "single-channel images (L, P or 16-bit)"
        )
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return label_map(arr, rel, dataset)


def grayscale_field():
    return Field(True, description="Convert images to one channel; false gives three (RGB).")


def size_field():
    return Field(
        None,
        ge=1,
        le=8192,
        description="Resize every image to size x size (bilinear, antialiased); none: all images must share one "
        "shape.",
    )


def decode_image(data: bytes, rel: str, grayscale: bool, size: int | None, dataset: str) -> torch.Tensor:
    """One image file's bytes as ``C x H x W`` float32 in [0, 1]: decoded, resized to ``size``
    (when given) and clamped. The load pass and the lazy cases both call it, so a case read
    later is bit for bit what the load checked."""
    return finish_image(image_array(open_image(data, rel, "image", dataset), rel, grayscale, dataset), size)


def finish_image(arr: np.ndarray, size: int | None) -> torch.Tensor:
    """A decoded ``C x H x W`` array (:func:`image_array`) resized to ``size`` and clamped to [0, 1]."""
    x = torch.from_numpy(arr)
    if size is not None:
        x = resize_image(x, size)
    return x.clamp(0.0, 1.0).contiguous()


def read_checked(path: Path, digest: str, rel: str, dataset: str) -> bytes:
    """The bytes of a data file read again for its case; a file changed since the load (whose
    sha256 is in the fingerprint) is refused rather than audited under the old fingerprint."""
    try:
        data, now = read_bytes(path)
    except OSError as exc:
        raise DataError(
            f"{dataset}: cannot read {rel} again ({type(exc).__name__}); was it moved since the load?"
        ) from None
    if now != digest:
        raise DataError(f"{dataset}: {rel} changed since the data set was loaded; load it again")
    return data


def file_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time of a file, to notice a change between the load and a later read."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def check_stamp(path: Path, stamp: tuple[int, int], rel: str, dataset: str) -> None:
    """Refuse to read a case's file again when it changed since the load (see :func:`read_checked`)."""
    try:
        now = file_stamp(path)
    except OSError as exc:
        raise DataError(
            f"{dataset}: cannot read {rel} again ({type(exc).__name__}); was it moved since the load?"
        ) from None
    if now != tuple(stamp):
        raise DataError(f"{dataset}: {rel} changed since the data set was loaded; load it again")


class ImageFileCases:
    """The cases of a folder of 2D images, read one file per case (``torch.utils.data.Dataset``
    protocol): holds paths, hashes and params only, so it pickles to DataLoader workers."""

    def __init__(
        self, root: Path, rels: list[str], hashes: list[str], labels: torch.Tensor, grayscale: bool, size: int | None,
        dataset: str,
    ):
        self.root, self.rels, self.hashes, self.labels = root, list(rels), list(hashes), labels
        self.grayscale, self.size, self.dataset = grayscale, size, dataset

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rel = self.rels[i]
        data = read_checked(self.root / rel, self.hashes[i], rel, self.dataset)
        return {"image": decode_image(data, rel, self.grayscale, self.size, self.dataset), "label": self.labels[i]}


def scan_images(
    root: Path, rels: list[str], p: Params, dataset: str
) -> tuple[list[tuple[str, str]], Counter, tuple[int, ...], tuple[float, float]]:
    """The load pass over the images ``root / rel``: each is read, hashed and decoded (a bad
    file fails here), then dropped. Returns their sha256, a count of their stored sizes, the
    shape of one case (``C x H x W``) and the intensity range in [0, 1]. ``p`` has ``grayscale``
    and ``size``; without ``size`` every image must have one shape."""
    hashes, stored = [], Counter()
    first: tuple[tuple[int, ...], str] | None = None
    low, high = math.inf, -math.inf
    for rel in rels:
        data, digest = read_bytes(root / rel)
        hashes.append((rel, digest))
        raw = image_array(open_image(data, rel, "image", dataset), rel, p.grayscale, dataset)
        shape = tuple(raw.shape[1:])
        stored[shape] += 1
        if p.size is None and first is not None and shape != first[0][1:]:
            raise DataError(
                f"{dataset}: image {rel} is {shape[0]} x {shape[1]} but image {first[1]} is "
                f"{first[0][1]} x {first[0][2]}; set size to resize them all"
            )
        x = finish_image(raw, p.size)
        if first is None:
            first = (tuple(x.shape), rel)
        if x.numel():
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    return hashes, stored, first[0], (low, high)


def describe(
    dataset: str, classes: list[str], labels: torch.Tensor, shape: tuple[int, ...], value_range: tuple[float, float],
    stored: Counter, size: int | None, extra: list[str], sensitive: dict[str, str],
) -> str:
    """Counts, shapes and intensity range; a part that happens to hold a sensitive value is dropped."""
    n, (c, h, w) = len(labels), shape
    per_class = Counter(labels.tolist())
    parts = [
        f"{dataset}: {n} images in {len(classes)} classes ("
        + ", ".join(f"{cls}: {per_class[i]}" for i, cls in enumerate(classes))
        + ")",
        f"{c} x {h} x {w} ({'grayscale' if c == 1 else 'RGB'}"
        + (f", resized to {size} x {size}" if size is not None else "")
        + ")",
        "stored H x W "
        + ", ".join(f"{s[0]} x {s[1]} ({k})" for s, k in sorted(stored.items(), key=lambda kv: (-kv[1], kv[0]))),
        f"intensity range [{value_range[0]:.3g}, {value_range[1]:.3g}]",
        *extra,
    ]
    return "; ".join(part for part in parts if not leaked_values(part, sensitive))


def crop_or_pad(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop or zero-pad each axis to ``shape``."""
    out = np.zeros(shape, dtype=arr.dtype)
    src, dst = [], []
    for n, t in zip(arr.shape, shape):
        if n >= t:
            start = (n - t) // 2
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
        else:
            start = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out
