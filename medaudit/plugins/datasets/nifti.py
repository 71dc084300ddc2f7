"""Datasets: nifti.

3D volumes and label maps from two folders of NIfTI files.

NIfTI is the common exchange format of 3D segmentation sets (CT, MRI), so volumetric
models can be audited on their own data without a conversion step. Volumes are read with
nibabel and reoriented to the closest canonical orientation (RAS+, ``nib.as_closest_canonical``:
axis flips and permutations only, no resampling), so cases stored in different orientations
reach the model the same way round; the arrays, indexed (X, Y, Z), are transposed to the
tensor layout D x H x W = (Z, Y, X) that 3D networks expect. A volume and its label map
must share one voxel grid (shape and affine); a mismatch is refused rather than guessed at.
The stored orientations (``nib.aff2axcodes``) are stated in the description; each case's
voxel spacing (reordered to D, H, W) goes into :attr:`LoadedData.spacing` when all cases
share one, else into :attr:`LoadedData.case_spacings`, so Hausdorff distances in millimetres
use each case's own scale.

The header's voxel count is checked against ``max_voxels`` before any data is read: a
corrupt or hostile header (30000^3 voxels, or a small .nii.gz that would inflate to
gigabytes) is refused instead of exhausting memory.

Case ids are pseudonyms keyed with a secret derived from the files' contents; file
names, which often carry patient identifiers, appear only in error messages on the
user's console (a mismatch of a volume's and its label map's affines names the case's
pseudonym). The names and stems of the files read, and the non-empty free-text header
fields ``descrip``, ``aux_file`` and ``db_name`` (which converters fill with series
descriptions, sometimes names or dates), go into :attr:`LoadedData.sensitive_values`, so the
run refuses to write an output that holds one.

``intensity_range: [low, high]`` maps intensities to [0, 1]; the DICOM datasets'
``window`` is ``[centre, width]`` instead, so a nifti spec that still says ``window`` is
refused with the new name rather than read with either meaning.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import np, torch
from medaudit.core.models import file_sha256
from medaudit.core.privacy import distinctive, drop_public, file_name_values, pseudonym, pseudonym_key
from medaudit.plugins.datasets._files import (
    check_folder,
    check_stamp,
    crop_or_pad,
    file_stamp,
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
#: Default of ``max_voxels``: 512^3 voxels, 512 MiB as float32.
MAX_VOXELS = 512**3
#: Tolerance of the image/label affine comparison (mm and direction cosines).
AFFINE_ATOL = 1e-3


def _key(name: str) -> str:
    """The name without its NIfTI extension: ``case1.nii.gz`` matches ``case1.nii``."""
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


class NiftiParams(Params):
    images: InputPath = Field(description="Folder of 3D volumes (*.nii, *.nii.gz); not searched recursively.")
    labels: InputPath = Field(description="Folder of label maps with the same names as the volumes (.nii or .nii.gz).")
    intensity_range: tuple[float, float] | None = Field(
        None,
        description="Intensities [low, high] mapped to [0, 1] with clipping (e.g. [-1000, 400] for CT in HU; the "
        "DICOM datasets' window is [centre, width] instead). Default: each volume's own min and max (per volume, so "
        "intensities are not comparable across cases).",
    )
    max_voxels: int = Field(
        MAX_VOXELS,
        ge=1,
        description="Largest volume in voxels, checked from each file's header before its data is read (default "
        "512^3 = 134217728, 512 MiB as float32): a larger one is refused instead of exhausting memory.",
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

    @model_validator(mode="before")
    @classmethod
    def _renamed_window(cls, data):
        """An old spec's ``window: [low, high]`` is refused, never read as the DICOM [centre, width]."""
        if isinstance(data, dict) and "window" in data:
            raise ValueError(
                "nifti's window [low, high] is now called intensity_range: [low, high] (window means [centre, width] "
                "in the DICOM datasets); rename the key"
            )
        return data

    @field_validator("intensity_range")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[1] > value[0]):
            raise ValueError("intensity_range must be two finite numbers [low, high] with high > low")
        return value

    @field_validator("shape")
    @classmethod
    def _positive(cls, value):
        if value is not None and min(value) < 1:
            raise ValueError("every size of shape must be >= 1")
        return value


def _header_texts(header) -> dict[str, str]:
    """The non-empty free-text values of a NIfTI header (descrip, aux_file, db_name), decoded,
    each mapped to its field's name."""
    out = {}
    for field in HEADER_TEXT_FIELDS:
        try:
            raw = header[field]
        except Exception:  # NIfTI-2 has no db_name
            continue
        value = raw.item() if hasattr(raw, "item") else raw
        text = (value.decode("latin-1") if isinstance(value, bytes) else str(value)).strip(" \x00\t\r\n")
        if distinctive(text):
            out[text] = field
    return out


def _read(path: Path, rel: str, what: str, dataset: str, labels: bool, max_voxels: int):
    """Return the voxel array in (D, H, W) order after reorientation to RAS+, the spacing
    (D, H, W), the stored axis codes, the canonical affine and the header's free-text values.
    The header's voxel count is checked against ``max_voxels`` before the data is read."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
    except Exception as exc:  # nibabel, gzip and numpy raise many types for corrupt files
        raise DataError(f"{dataset}: cannot read {what} {rel}: {type(exc).__name__}: {exc}") from None
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise DataError(
            f"{dataset}: {what} {rel}: its header announces {_fmt(shape)} = {voxels:,} voxels, more than max_voxels "
            f"{max_voxels:,}; a corrupt header, or raise max_voxels if the volume is real and fits in memory"
        )
    try:
        codes = "".join(c or "?" for c in nib.aff2axcodes(img.affine))
        img = nib.as_closest_canonical(img)
        if labels:
            arr = np.asanyarray(img.dataobj)
        else:
            arr = img.get_fdata(dtype=np.float32)
        # float32 zooms to 6 significant digits: 0.7, not 0.699999988
        zooms = tuple(float(f"{float(z):.6g}") for z in img.header.get_zooms())
        texts = _header_texts(img.header)
    except Exception as exc:  # nibabel, gzip and numpy raise many types for corrupt files
        raise DataError(f"{dataset}: cannot read {what} {rel}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{dataset}: {what} {rel} has shape {tuple(arr.shape)} (X, Y, Z, ...); this dataset reads 3D volumes")
    # nibabel indexes (X, Y, Z); the tensor layout is (D, H, W) = (Z, Y, X).
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), tuple(reversed(zooms[:3])), codes, img.affine, texts


def _scale(arr: np.ndarray, intensity_range: tuple[float, float] | None) -> np.ndarray:
    """[low, high] (or the volume's own min-max) to [0, 1], clipped."""
    low, high = intensity_range if intensity_range is not None else (float(arr.min()), float(arr.max()))
    if high <= low:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float64) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _fmt(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _read_case(p: NiftiParams, image_name: str, label_name: str, case: str, dataset: str):
    """One case read and checked: its scaled (and cropped or padded) ``D x H x W`` float32 volume,
    its int64 label map and its facts (raw intensity range, spacing, stored orientation, header
    texts). The load pass and the lazy cases both call it, so a case read later is what the
    load checked."""
    vol, spacing, codes, affine, texts = _read(
        p.images / image_name, image_name, "volume", dataset, labels=False, max_voxels=p.max_voxels
    )
    lab, _, _, label_affine, label_texts = _read(
        p.labels / label_name, label_name, "label map", dataset, labels=True, max_voxels=p.max_voxels
    )
    if not np.isfinite(vol).all():
        raise DataError(f"{dataset}: volume {image_name} contains NaN or Inf voxels")
    lab = label_map(lab, label_name, dataset)
    if lab.shape != vol.shape:
        raise DataError(
            f"{dataset}: label map {label_name} is {_fmt(lab.shape)} (D x H x W) but its volume is {_fmt(vol.shape)}"
        )
    if not np.allclose(label_affine, affine, rtol=0, atol=AFFINE_ATOL):
        raise DataError(
            f"{dataset}: case {case}: the affine of its label map differs from its volume's, so the two do not lie "
            "on one voxel grid in the world; resample the label map onto the volume's grid"
        )
    value_range = (float(vol.min()), float(vol.max())) if vol.size else None
    vol = _scale(vol, p.intensity_range)
    if p.shape is not None:
        vol, lab = crop_or_pad(vol, p.shape), crop_or_pad(lab, p.shape)
    facts = {"range": value_range, "spacing": spacing, "codes": codes, "texts": texts, "label_texts": label_texts}
    return vol, lab, facts


class NiftiCases:
    """The cases of a nifti set, read one volume and label map per case with nibabel (see
    :func:`_read_case`); paths and params only, so it pickles to DataLoader workers."""

    def __init__(self, p: NiftiParams, pairs, case_ids: list[str], stamps, dataset: str):
        self.p, self.pairs, self.case_ids, self.stamps, self.dataset = p, list(pairs), list(case_ids), stamps, dataset

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        (image_name, label_name), p, ds = self.pairs[i], self.p, self.dataset
        check_stamp(p.images / image_name, self.stamps[i][0], image_name, ds)
        check_stamp(p.labels / label_name, self.stamps[i][1], label_name, ds)
        vol, lab, _ = _read_case(p, image_name, label_name, self.case_ids[i], ds)
        return {"image": torch.from_numpy(vol)[None], "label": torch.tensor(0), "mask": torch.from_numpy(lab)}


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
        image_names, label_names = list_files(p.images, SUFFIXES, ds), list_files(p.labels, SUFFIXES, ds)
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

        hashes = []
        for image_name, label_name in pairs:
            hashes += [
                ("images/" + image_name, file_sha256(p.images / image_name)),
                ("labels/" + label_name, file_sha256(p.labels / label_name)),
            ]
        key = pseudonym_key(h for _, h in hashes)
        case_ids = [pseudonym(key, image_name) for image_name, _ in pairs]

        spacings, orientations, stamps = [], [], []
        sensitive: dict[str, str] = {}
        raw_min, raw_max, max_label = math.inf, -math.inf, 0
        shape: tuple[int, ...] | None = None
        for (image_name, label_name), case in zip(pairs, case_ids):  # the load pass: read, check, drop
            stamps.append((file_stamp(p.images / image_name), file_stamp(p.labels / label_name)))
            vol, lab, facts = _read_case(p, image_name, label_name, case, ds)
            headers = (("volume", image_name, facts["texts"]), ("label map", label_name, facts["label_texts"]))
            for what, name, header in headers:
                sensitive |= {text: f"NIfTI header {field} of the {what} of case {case}" for text, field in header.items()}
                source = f"{what} file name of case {case}"
                sensitive |= file_name_values(name, source) | file_name_values(_key(name), source)
            if facts["range"] is not None:
                raw_min, raw_max = min(raw_min, facts["range"][0]), max(raw_max, facts["range"][1])
            if p.shape is None and shape is not None and vol.shape != shape:
                raise DataError(
                    f"{ds}: volume {image_name} is {_fmt(vol.shape)} (D x H x W) but earlier volumes are "
                    f"{_fmt(shape)}; set shape to crop or pad them all"
                )
            shape = shape or vol.shape
            if lab.size:
                max_label = max(max_label, int(lab.max()))
            spacings.append(facts["spacing"])
            orientations.append(facts["codes"])
            del vol, lab

        names = mask_class_names(max_label, p.class_names, ds)
        fingerprint = fingerprint_of(hashes, p.model_dump(mode="json", exclude={"images", "labels", "max_voxels"}))

        same_spacing = all(np.allclose(s, spacings[0], rtol=1e-4, atol=1e-6) for s in spacings)
        n, (d, h, w) = len(pairs), shape
        scaled = (
            f"intensity range [{p.intensity_range[0]:g}, {p.intensity_range[1]:g}] mapped to [0, 1]"
            if p.intensity_range is not None
            else "each volume's own min-max mapped to [0, 1]"
        )
        parts = [
            f"{ds}: {n} volumes, {d} x {h} x {w} (D x H x W)"
            + (" after centre crop/zero pad" if p.shape is not None else ""),
            f"raw intensity range [{raw_min:.4g}, {raw_max:.4g}], {scaled}",
            f"spacing {_fmt(spacings[0])} mm (D x H x W)"
            if same_spacing
            else f"spacing differs between cases ({len(set(spacings))} spacings, D x H x W); distances use each case's",
            "stored orientation " + ", ".join(f"{c} ({k})" for c, k in sorted(Counter(orientations).items()))
            + ", reoriented to RAS",
            f"{len(names)} label classes",
        ]
        if unmatched:
            parts.append(f"{unmatched} label maps without a volume were ignored")
        return LoadedData(
            images=None,
            cases=NiftiCases(p, pairs, case_ids, stamps, ds),
            image_shape=(1, d, h, w),
            labels=torch.zeros(n, dtype=torch.long),
            case_ids=case_ids,
            class_names=["image"],
            fingerprint=fingerprint,
            mask_class_names=names,
            description="; ".join(parts),
            spacing=tuple(spacings[0]) if same_spacing else None,
            case_spacings=None if same_spacing else spacings,
            intensity_window=tuple(p.intensity_range) if p.intensity_range is not None else None,
            intensity_unit="intensity units of the files (HU for CT)",
            sensitive_values=drop_public(sensitive, ["image", *names]),
        )


@hookimpl
def register_datasets(register):
    register(Nifti)
