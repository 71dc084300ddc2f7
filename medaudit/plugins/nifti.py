"""Built-in dataset ``nifti``: 3D volumes and label maps from two folders of NIfTI files.

NIfTI is the common exchange format of 3D segmentation sets (CT, MRI), so volumetric
models can be audited on their own data without a conversion step. Volumes are read with
nibabel, whose arrays are indexed (X, Y, Z) in voxel order; they are transposed to the
tensor layout D x H x W = (Z, Y, X) that 3D networks expect. No resampling or
reorientation is done: the model is audited on the voxel grid it is given. Orientation
(``nib.aff2axcodes``) and voxel spacing (reordered to D, H, W) are recorded, in the
description and in :attr:`LoadedData.spacing`, so reports can state them and metrics in
millimetres (Hausdorff distances) use the right scale.

Case ids are pseudonyms keyed with a secret derived from the files' contents; file
names, which often carry patient identifiers, appear only in error messages on the
user's console. The names and stems of the files read, and the non-empty free-text header
fields ``descrip``, ``aux_file`` and ``db_name`` (which converters fill with series
descriptions, sometimes names or dates), go into :attr:`LoadedData.sensitive_values`, so the
run refuses to write an output that holds one.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, LoadedData, Params, Task, resolve_path
from medaudit.core.errors import DataError
from medaudit.core.models import file_sha256
from medaudit.core.privacy import distinctive, drop_public, file_name_values, pseudonym, pseudonym_key
from medaudit.plugins.image_folders import (
    check_folder,
    fingerprint_of,
    index_by_key,
    label_map,
    list_files,
    mask_class_names,
    match_by_key,
)

SUFFIXES = (".nii.gz", ".nii")
#: Free-text header fields that may carry identifying text (a name, an id, a date).
HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name")


def _key(name: str) -> str:
    """The name without its NIfTI extension: ``case1.nii.gz`` matches ``case1.nii``."""
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


class NiftiParams(Params):
    images: Path = Field(description="Folder of 3D volumes (*.nii, *.nii.gz); not searched recursively.")
    labels: Path = Field(description="Folder of label maps with the same names as the volumes (.nii or .nii.gz).")
    window: tuple[float, float] | None = Field(
        None,
        description="Intensity window [low, high] mapped to [0, 1] with clipping (e.g. [-1000, 400] for CT in "
        "HU). Default: each volume's own min and max (per-volume, so intensities are not comparable across cases).",
    )
    shape: tuple[int, int, int] | None = Field(
        None,
        description="Centre-crop or zero-pad every volume and label map to D x H x W (after windowing, so padding "
        "is 0 and background). None: all volumes must share one shape.",
    )
    class_names: list[str] | None = Field(
        None, description="Names of the label classes; default class0..classK-1 from the largest label."
    )
    max_cases: int | None = Field(None, ge=1, description="Read only the first cases (sorted by file name).")

    @field_validator("images", "labels", mode="before")
    @classmethod
    def _resolve(cls, value, info: ValidationInfo) -> Path:
        return resolve_path(value, info)

    @field_validator("window")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[1] > value[0]):
            raise ValueError("window must be two finite numbers [low, high] with high > low")
        return value

    @field_validator("shape")
    @classmethod
    def _positive(cls, value):
        if value is not None and min(value) < 1:
            raise ValueError("every size of shape must be >= 1")
        return value


def _header_texts(header) -> set[str]:
    """The non-empty free-text fields of a NIfTI header (descrip, aux_file, db_name), decoded."""
    out = set()
    for field in HEADER_TEXT_FIELDS:
        try:
            raw = header[field]
        except Exception:  # NIfTI-2 has no db_name
            continue
        value = raw.item() if hasattr(raw, "item") else raw
        text = (value.decode("latin-1") if isinstance(value, bytes) else str(value)).strip(" \x00\t\r\n")
        if distinctive(text):
            out.add(text)
    return out


def _read(path: Path, rel: str, what: str, dataset: str, labels: bool):
    """Return the voxel array in (D, H, W) order, the spacing (D, H, W), the axis codes and the
    header's free-text values."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if labels:
            arr = np.asanyarray(img.dataobj)
        else:
            arr = img.get_fdata(dtype=np.float32)
        # float32 zooms to 6 significant digits: 0.7, not 0.699999988
        zooms = tuple(float(f"{float(z):.6g}") for z in img.header.get_zooms())
        codes = "".join(c or "?" for c in nib.aff2axcodes(img.affine))
        texts = _header_texts(img.header)
    except Exception as exc:  # nibabel, gzip and numpy raise many types for corrupt files
        raise DataError(f"{dataset}: cannot read {what} {rel}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{dataset}: {what} {rel} has shape {tuple(arr.shape)} (X, Y, Z, ...); this dataset reads 3D volumes")
    # nibabel indexes (X, Y, Z); the tensor layout is (D, H, W) = (Z, Y, X).
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), tuple(reversed(zooms[:3])), codes, texts


def _window(arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    low, high = window if window is not None else (float(arr.min()), float(arr.max()))
    if high <= low:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float64) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


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


def _fmt(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


class Nifti(Dataset):
    """3D volumes and label maps from two folders of NIfTI files (D x H x W = Z, Y, X)."""

    name = "nifti"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({3})
    Params = NiftiParams

    def load(self) -> LoadedData:
        p: NiftiParams = self.params
        ds = self.name
        check_folder(p.images, "images", ds)
        check_folder(p.labels, "labels", ds)
        image_names, label_names = list_files(p.images, SUFFIXES), list_files(p.labels, SUFFIXES)
        if not image_names:
            raise DataError(f"{ds}: no volumes (*.nii, *.nii.gz) in {p.images}")
        if not label_names:
            raise DataError(f"{ds}: no label maps (*.nii, *.nii.gz) in {p.labels}")
        pairs = match_by_key(
            index_by_key(image_names, _key, "volume", ds),
            index_by_key(label_names, _key, "label map", ds),
            "volume",
            "label map",
            ds,
        )
        unmatched = len(label_names) - len(pairs)
        if p.max_cases is not None:
            pairs = pairs[: p.max_cases]

        images, labels, hashes, spacings, orientations = [], [], [], [], []
        sensitive: set[str] = set()
        raw_min, raw_max = math.inf, -math.inf
        shape: tuple[int, ...] | None = None
        for image_name, label_name in pairs:
            hashes += [
                ("images/" + image_name, file_sha256(p.images / image_name)),
                ("labels/" + label_name, file_sha256(p.labels / label_name)),
            ]
            vol, spacing, codes, texts = _read(p.images / image_name, image_name, "volume", ds, labels=False)
            lab, _, _, label_texts = _read(p.labels / label_name, label_name, "label map", ds, labels=True)
            sensitive |= texts | label_texts
            for name in (image_name, label_name):
                sensitive |= file_name_values(name) | file_name_values(_key(name))
            if not np.isfinite(vol).all():
                raise DataError(f"{ds}: volume {image_name} contains NaN or Inf voxels")
            lab = label_map(lab, label_name, ds)
            if lab.shape != vol.shape:
                raise DataError(
                    f"{ds}: label map {label_name} is {_fmt(lab.shape)} (D x H x W) but its volume is {_fmt(vol.shape)}"
                )
            if vol.size:
                raw_min, raw_max = min(raw_min, float(vol.min())), max(raw_max, float(vol.max()))
            vol = _window(vol, p.window)
            if p.shape is not None:
                vol, lab = crop_or_pad(vol, p.shape), crop_or_pad(lab, p.shape)
            elif shape is None:
                shape = vol.shape
            elif vol.shape != shape:
                raise DataError(
                    f"{ds}: volume {image_name} is {_fmt(vol.shape)} (D x H x W) but earlier volumes are "
                    f"{_fmt(shape)}; set shape to crop or pad them all"
                )
            images.append(torch.from_numpy(vol))
            labels.append(torch.from_numpy(lab))
            spacings.append(spacing)
            orientations.append(codes)

        images_t = torch.stack(images).unsqueeze(1).contiguous()
        masks_t = torch.stack(labels).contiguous()
        names = mask_class_names(int(masks_t.max()), p.class_names, ds)
        fingerprint = fingerprint_of(hashes, p.model_dump(mode="json", exclude={"images", "labels"}))
        key = pseudonym_key(h for _, h in hashes)
        case_ids = [pseudonym(key, image_name) for image_name, _ in pairs]

        spacing = spacings[0]
        same_spacing = all(np.allclose(s, spacing, rtol=1e-4, atol=1e-6) for s in spacings)
        n, _, d, h, w = images_t.shape
        window = (
            f"window [{p.window[0]:g}, {p.window[1]:g}]" if p.window is not None else "each volume's own min-max window"
        )
        parts = [
            f"{ds}: {n} volumes, {d} x {h} x {w} (D x H x W)"
            + (" after centre crop/zero pad" if p.shape is not None else ""),
            f"raw intensity range [{raw_min:.4g}, {raw_max:.4g}], {window}",
            f"spacing {_fmt(spacing)} mm (D x H x W)"
            + ("" if same_spacing else " of the first case; spacing differs between cases"),
            "orientation " + ", ".join(f"{c} ({k})" for c, k in sorted(Counter(orientations).items())),
            f"{len(names)} label classes",
        ]
        if unmatched:
            parts.append(f"{unmatched} label maps without a volume were ignored")
        return LoadedData(
            images=images_t,
            labels=torch.zeros(n, dtype=torch.long),
            case_ids=case_ids,
            class_names=["image"],
            fingerprint=fingerprint,
            masks=masks_t,
            mask_class_names=names,
            description="; ".join(parts),
            spacing=tuple(float(s) for s in spacing),
            intensity_window=tuple(p.window) if p.window is not None else None,
            intensity_unit="intensity units of the files (HU for CT)",
            sensitive_values=frozenset(drop_public(sensitive, ["image", *names])),
        )


@hookimpl
def register_datasets(register):
    register(Nifti)
