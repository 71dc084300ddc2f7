"""Built-in dataset ``image-mask-folder``: 2D images and segmentation masks from two folders.

Most 2D segmentation sets are shipped as a folder of images and a folder of masks with
the same file stems, so that is what this reads, without a conversion step that could
silently change the data. Masks must be lossless (PNG, TIFF, BMP): JPEG compression
invents labels at every edge, so JPEG masks are refused rather than guessed at.

Case ids are pseudonyms (:func:`medaudit.core.privacy.pseudonym`, keyed with a secret
derived from the files' contents, never written out) because file names often carry
patient identifiers; neither the case ids nor the description contain file names, and the
names and stems of the files read go into :attr:`LoadedData.sensitive_values`, so the run
refuses to write an output that holds one (a name that is part of a class name is left
out: the report shows class names anyway; so are ordinary names, see
:func:`medaudit.core.privacy.ordinary`). Error messages do name the file (they go to the
user's own console only), so a bad file is easy to find and fix. Every file must lie inside
its folder once symbolic links are resolved (:func:`inside`).

The helpers in this module (listing, matching, fingerprints, reading 2D images) are shared
by the other file-based datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.privacy import drop_public, file_name_values, pseudonym, pseudonym_key

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")

#: Integer image modes of Pillow read as 16-bit intensities (scaled by 65535).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# -- helpers shared with the nifti dataset -----------------------------------------------


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


# -- the dataset -------------------------------------------------------------------------


class ImageMaskFolderParams(Params):
    images: InputPath = Field(description="Folder of 2D images (png, tif, bmp, jpg); not searched recursively.")
    masks: InputPath = Field(
        description="Folder of masks with the same file stems as the images (lossless: png, tif, bmp)."
    )
    grayscale: bool = Field(True, description="Convert images to one channel; false gives three (RGB).")
    size: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="Resize to size x size (images bilinear, masks nearest); none: all images must share one shape.",
    )
    class_names: list[str] | None = Field(
        None, description="Names of the mask classes; default class0..classK-1 from the largest label."
    )
    mask_values: list[int] | None = Field(
        None,
        description="Pixel value of each class in the masks: the i-th value becomes class i (e.g. [0, 255] for "
        "binary masks saved as 0/255). Default: pixel values are the class indices.",
    )
    max_cases: int | None = Field(None, ge=1, description="Read only the first cases (sorted by file name).")

    @field_validator("mask_values")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("mask_values must list at least one value")
            if len(set(value)) != len(value):
                raise ValueError("mask_values must be distinct")
            if min(value) < 0:
                raise ValueError("mask_values must be >= 0")
        return value

    @model_validator(mode="after")
    def _names_match_values(self) -> "ImageMaskFolderParams":
        if self.class_names is not None and self.mask_values is not None and len(self.class_names) != len(self.mask_values):
            raise ValueError(
                f"class_names has {len(self.class_names)} names but mask_values has {len(self.mask_values)} values"
            )
        return self


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
    if img.mode in _WIDE_MODES or img.mode == "F":
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


def _mask_array(img, rel: str, dataset: str) -> np.ndarray:
    """``H x W`` int64 class map; single-channel modes only (palette masks give their indices)."""
    if img.mode not in ("1", "L", "P", "F") + _WIDE_MODES:
        raise DataError(
            f"{dataset}: mask {rel} has {len(img.getbands())} channels (mode {img.mode}); save masks as "
            "single-channel images (L, P or 16-bit)"
        )
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return label_map(arr, rel, dataset)


class ImageMaskFolder(Dataset):
    """2D images and segmentation masks from two folders, matched by file stem."""

    name = "image-mask-folder"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2})
    Params = ImageMaskFolderParams

    def load(self) -> LoadedData:
        p: ImageMaskFolderParams = self.params
        ds = self.name
        check_folder(p.images, "images", ds)
        check_folder(p.masks, "masks", ds)
        image_names = list_files(p.images, IMAGE_SUFFIXES, ds)
        mask_names = list_files(p.masks, MASK_SUFFIXES + LOSSY_SUFFIXES, ds)
        if not image_names:
            raise DataError(f"{ds}: no images ({', '.join(IMAGE_SUFFIXES)}) in {p.images}")
        if not mask_names:
            raise DataError(f"{ds}: no masks ({', '.join(MASK_SUFFIXES)}) in {p.masks}")
        stem = lambda name: Path(name).stem  # noqa: E731
        pairs = match_by_key(
            index_by_key(image_names, stem, "image", ds), index_by_key(mask_names, stem, "mask", ds), "image", "mask", ds
        )
        unmatched_masks = len(mask_names) - len(pairs)
        if p.max_cases is not None:
            pairs = pairs[: p.max_cases]

        images, masks, hashes = [], [], []
        shape: tuple[int, int] | None = None
        for image_name, mask_name in pairs:
            if Path(mask_name).suffix.lower() in LOSSY_SUFFIXES:
                raise DataError(f"{ds}: mask {mask_name} is a JPEG; JPEG is lossy and alters labels, save masks as PNG")
            image_bytes, image_hash = read_bytes(p.images / image_name)
            mask_bytes, mask_hash = read_bytes(p.masks / mask_name)
            hashes += [("images/" + image_name, image_hash), ("masks/" + mask_name, mask_hash)]
            image = image_array(open_image(image_bytes, image_name, "image", ds), image_name, p.grayscale, ds)
            mask = _mask_array(open_image(mask_bytes, mask_name, "mask", ds), mask_name, ds)
            if mask.shape != image.shape[1:]:
                raise DataError(
                    f"{ds}: mask {mask_name} is {mask.shape[0]}x{mask.shape[1]} but its image is "
                    f"{image.shape[1]}x{image.shape[2]}"
                )
            if p.mask_values is not None:
                mask = self._map_values(mask, p.mask_values, mask_name)
            x, m = torch.from_numpy(image), torch.from_numpy(mask)
            if p.size is not None:
                x, m = self._resize(x, m, p.size)
            elif shape is None:
                shape = tuple(m.shape)
            elif tuple(m.shape) != shape:
                raise DataError(
                    f"{ds}: image {image_name} is {m.shape[0]}x{m.shape[1]} but earlier images are "
                    f"{shape[0]}x{shape[1]}; set size to resize them all"
                )
            images.append(x)
            masks.append(m)

        images_t = torch.stack(images).clamp_(0.0, 1.0).contiguous()
        masks_t = torch.stack(masks).contiguous()
        max_label = int(masks_t.max())
        if p.mask_values is not None:
            max_label = max(max_label, len(p.mask_values) - 1)
        names = mask_class_names(max_label, p.class_names, ds)
        fingerprint = fingerprint_of(hashes, p.model_dump(mode="json", exclude={"images", "masks"}))
        key = pseudonym_key(h for _, h in hashes)
        case_ids = [pseudonym(key, image_name) for image_name, _ in pairs]
        sensitive: dict[str, str] = {}
        for (image_name, mask_name), case in zip(pairs, case_ids):
            sensitive |= file_name_values(image_name, f"file name of case {case}")
            sensitive |= file_name_values(mask_name, f"mask file name of case {case}")
        n, c, h, w = images_t.shape
        description = (
            f"{ds}: {n} cases, {c} x {h} x {w} ({'grayscale' if c == 1 else 'RGB'}"
            f"{f', resized to {p.size} x {p.size}' if p.size is not None else ''}), "
            f"intensity range [{float(images_t.min()):.3g}, {float(images_t.max()):.3g}], "
            f"{len(names)} mask classes"
            + (f"; {unmatched_masks} masks without an image were ignored" if unmatched_masks else "")
        )
        return LoadedData(
            images=images_t,
            labels=torch.zeros(n, dtype=torch.long),
            case_ids=case_ids,
            class_names=["image"],
            fingerprint=fingerprint,
            masks=masks_t,
            mask_class_names=names,
            description=description,
            sensitive_values=drop_public(sensitive, ["image", *names]),
        )

    def _map_values(self, mask: np.ndarray, values: list[int], rel: str) -> np.ndarray:
        lookup = np.asarray(values, dtype=np.int64)
        order = np.argsort(lookup)
        pos = np.clip(np.searchsorted(lookup[order], mask), 0, len(values) - 1)
        found = lookup[order][pos] == mask
        if not found.all():
            bad = sorted(set(np.unique(mask[~found]).tolist()))
            raise DataError(
                f"{self.name}: mask {rel} has value {bad[0]} not in mask_values {values}"
                + (f" ({len(bad)} such values)" if len(bad) > 1 else "")
            )
        return order[pos].astype(np.int64)

    @staticmethod
    def _resize(x: torch.Tensor, m: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(m.shape) == (size, size):
            return x, m
        x = resize_image(x, size)
        m = F.interpolate(m[None, None].double(), size=(size, size), mode="nearest-exact")[0, 0].round().long()
        return x, m


@hookimpl
def register_datasets(register):
    register(ImageMaskFolder)
