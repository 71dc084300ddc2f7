"""Datasets: dicom-series.

DICOM volumes (CT/MR series) in one subfolder per class.

Layout: ``path/<class>/...``, one subfolder per class (sorted by name unless the
``classes`` param lists them in order). Each class folder is searched recursively (so
the usual ``patient/study/series`` export folders work; hidden entries, ``DICOMDIR`` and
symbolic links to folders are skipped) for ``*.dcm`` files and files of any other name
that start with the DICOM prefix (``DICM`` after the 128-byte preamble, as in UID-named
exports). Other files are ignored and counted. Each case is one volume, classified as a
whole: the images are ``N x 1 x D x H x W``.

* Single-frame files are grouped into series by Series Instance UID (wherever they lie in
  the class folder; one series in two class folders is an error). The slices are sorted
  by Image Position (Patient) projected on the slice normal (the cross product of the
  Image Orientation (Patient) row and column directions); every slice must have the same
  orientation. When a slice has no position or orientation, the series is sorted by
  Instance Number instead (missing slices cannot be detected then).
* A multi-frame file (Number of Frames > 1) is one volume on its own. Its frames are
  ordered by the per-frame Plane Position (enhanced CT/MR functional groups) or the Grid
  Frame Offset Vector (RT Dose) when present, else kept in stored order.

Checks, each an error naming the case by its pseudonym and the problem: slices of
different Rows x Columns or Pixel Spacing in one volume, two slices at the same position
(or with the same Instance Number when there are no positions), and uneven slice spacing,
the sign of missing slices: a gap between neighbouring slices that differs from the
median gap by more than ``spacing_tolerance`` (a fraction of the median). A volume needs at
least 2 slices (single images belong in ``dicom-folder``).

Pixels: each slice goes through the same code as ``dicom-folder``
(:func:`medaudit.plugins.datasets._dicom.read_pixels`): its own Modality LUT (Rescale
Slope/Intercept, Modality LUT Sequence, or the Pixel Value Transformation of an enhanced
file's functional groups), so CT is in HU; then the volume is mapped to [0, 1] by the
``window`` param [centre, width], else the VOI transform of its first slice (in sorted
order: VOI LUT Sequence, else Window Center/Width with its VOI LUT Function; an enhanced
file's Frame VOI LUT), else the volume's own min and max (:func:`medaudit.plugins.datasets._dicom.voi_values`);
MONOCHROME1 slices are inverted after windowing. ``shape`` centre-crops or zero-pads every
volume to D x H x W (after windowing); without it all volumes must share one shape.
D x H x W follow the sorted slices, Rows and Columns; no resampling or reorientation is
done. Spacing (slice spacing from the positions, else Spacing Between Slices or Slice
Thickness; then Pixel Spacing) is recorded in :attr:`LoadedData.spacing` (D, H, W) and
the description.

Privacy is that of ``dicom-folder``: case ids are pseudonyms of the class folder and the
Series Instance UID (of the file's path for a multi-frame file); the description holds
aggregate technical facts only; errors name cases (or, before files are grouped, single
files) by pseudonym and never quote a header value or a file name. Every file's header is
harvested into :attr:`LoadedData.sensitive_values` exactly as ``dicom-folder`` does, with
the file names and the names of the folders between the class folder and the file;
:attr:`LoadedData.pixels_may_identify` is set unless every file declares Burned In
Annotation = NO.

Not supported: colour (RGB, YBR) and palette images; volumes with more than one
orientation or with gantry tilt beyond a plane stack (slices are assumed parallel and
their positions are only projected on the normal, not checked to lie along it); 4D series
(several time points or echoes sharing one Series Instance UID, which show up as
duplicate positions); per-frame windows of enhanced files (the first frame's is used);
segmentation (SEG/RTSTRUCT) objects.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import np, torch
from medaudit.core.models import file_sha256
from medaudit.core.privacy import drop_public, file_name_values, leaked_values, pseudonym, pseudonym_key
from medaudit.plugins.datasets._dicom import (
    DicomClassFolderParams,
    functional_item,
    harvest,
    has_dicom_prefix,
    header_number,
    header_numbers,
    header_text,
    linear_window,
    quiet_pydicom,
    read_dicom,
    read_pixels,
    voi_values,
)
from medaudit.plugins.datasets._files import (
    check_folder,
    check_stamp,
    class_folders,
    crop_or_pad,
    file_stamp,
    fingerprint_of,
    inside,
)

#: Two slices closer than this (mm, along the normal) are at the same position.
SAME_POSITION_MM = 1e-3
#: Largest difference between two slices' direction cosines that still counts as one orientation.
ORIENTATION_ATOL = 1e-3


class DicomSeriesParams(DicomClassFolderParams):
    path: InputPath = Field(
        description="Root folder with one subfolder per class; each class folder is searched recursively for DICOM "
        "series (single-frame slices) and multi-frame DICOM files, each one case."
    )
    shape: tuple[int, int, int] | None = Field(
        None,
        description="Centre-crop or zero-pad every volume to D x H x W (after windowing). None: all volumes must "
        "share one shape.",
    )
    spacing_tolerance: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Largest allowed difference between a gap between neighbouring slices and the median gap, as a "
        "fraction of the median; a larger one is reported as missing slices.",
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, value):
        if value is not None and min(value) < 1:
            raise ValueError("every size of shape must be >= 1")
        return value


@dataclass
class _Slice:
    """The header facts of one file needed to group and order it (no identifying values)."""

    path: Path
    rel: str  # class/... relative path: pseudonym input only, never shown
    frames: int
    series: str | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    instance: float | None
    size: tuple[int, int] | None


@dataclass
class _Case:
    label: int
    cls: str
    name: str  # pseudonym input
    slices: list[_Slice] = field(default_factory=list)

    @property
    def multi_frame(self) -> bool:
        return self.slices[0].frames > 1


def _walk(folder: Path) -> Iterator[Path]:
    """Visible files under ``folder``, sorted, without following links to folders."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and name.upper() != "DICOMDIR" and path.is_file():
                yield path


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or has_dicom_prefix(path)


def _geometry(ds, frame: int = 0) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Image Position and Orientation (Patient) of a frame: top level, else the functional groups."""
    position = header_numbers(ds, "ImagePositionPatient")
    if position is None:
        item = functional_item(ds, "PlanePositionSequence", frame)
        position = header_numbers(item, "ImagePositionPatient") if item is not None else None
    orientation = header_numbers(ds, "ImageOrientationPatient")
    if orientation is None:
        item = functional_item(ds, "PlaneOrientationSequence", frame)
        orientation = header_numbers(item, "ImageOrientationPatient") if item is not None else None
    return (
        position if position is not None and len(position) == 3 else None,
        orientation if orientation is not None and len(orientation) == 6 else None,
    )


def _slice_facts(ds, path: Path, rel: str) -> _Slice:
    frames = header_number(ds, "NumberOfFrames")
    rows, columns = header_number(ds, "Rows"), header_number(ds, "Columns")
    position, orientation = _geometry(ds)
    return _Slice(
        path=path,
        rel=rel,
        frames=int(frames) if frames is not None and frames >= 1 and frames == int(frames) else 1,
        series=header_text(ds, "SeriesInstanceUID") or None,
        position=position,
        orientation=orientation,
        instance=header_number(ds, "InstanceNumber"),
        size=(int(rows), int(columns)) if rows is not None and columns is not None else None,
    )


def _distances(
    positions: list[tuple[float, ...] | None], orientations: list[tuple[float, ...] | None], where: str
) -> list[float] | None:
    """Each slice's position along the common slice normal; None when a slice lacks either."""
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return None
    first = np.asarray(orientations[0])
    if any(np.abs(np.asarray(o) - first).max() > ORIENTATION_ATOL for o in orientations[1:]):
        raise DataError(
            f"{where}: its slices have different orientations (Image Orientation (Patient)); a volume must be one "
            "stack of parallel slices"
        )
    normal = np.cross(first[:3], first[3:])
    length = float(np.linalg.norm(normal))
    if not math.isfinite(length) or length < 0.5:
        return None  # degenerate direction cosines: fall back to another order
    normal /= length
    return [float(np.dot(np.asarray(p), normal)) for p in positions]


def _frame_distances(ds, frames: int, where: str) -> list[float] | None:
    """Positions of a multi-frame file's frames along the slice normal: from the per-frame Plane
    Position functional groups, else the Grid Frame Offset Vector (RT Dose); None when neither."""
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if groups is not None and len(groups) == frames:
        positions, orientations = [], []
        for i in range(frames):
            item = functional_item(ds, "PlanePositionSequence", i)
            if item is None or (position := header_numbers(item, "ImagePositionPatient")) is None or len(position) != 3:
                positions = None
                break
            positions.append(position)
            orientations.append(_geometry(ds, i)[1])
        if positions is not None:
            return _distances(positions, orientations, where)
    offsets = header_numbers(ds, "GridFrameOffsetVector")  # offsets along the normal, from the first frame
    return list(offsets) if offsets is not None and len(offsets) == frames else None


def _order(
    distances: list[float] | None, instances: list[float | None] | None, tolerance: float, where: str
) -> tuple[list[int], float | None, str]:
    """Slice order, slice spacing (mm, None when unknown) and the ordering used."""
    n = len(distances) if distances is not None else len(instances or [])
    if distances is not None:
        order = sorted(range(n), key=lambda i: distances[i])
        gaps = np.diff(np.asarray([distances[i] for i in order]))
        same = int((gaps < SAME_POSITION_MM).sum())
        if same:
            raise DataError(
                f"{where}: slices at the same position ({same} duplicate{'s' if same > 1 else ''}: copies of one file, "
                "or several time points or echoes in one series); remove the duplicates"
            )
        spacing = float(np.median(gaps))
        worst = float(np.abs(gaps - spacing).max())
        if worst > tolerance * spacing:
            raise DataError(
                f"{where}: uneven slice spacing (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm, median "
                f"{spacing:.4g} mm): missing slices? (spacing_tolerance {tolerance:g})"
            )
        return order, spacing, "Image Position (Patient)"
    if instances is not None and all(i is not None for i in instances):
        if len(set(instances)) < n:
            raise DataError(
                f"{where}: two slices with the same Instance Number and no Image Position (Patient) and Orientation "
                "to order them; remove the duplicates"
            )
        return sorted(range(n), key=lambda i: instances[i]), None, "Instance Number"
    if instances is None:  # frames of a multi-frame file
        return list(range(n)), None, "stored frame order"
    raise DataError(
        f"{where}: slice order unknown: not every slice has Image Position and Orientation (Patient), nor an "
        "Instance Number"
    )


def _fallback_spacing(ds) -> float | None:
    """Spacing Between Slices, else Slice Thickness (top level or the pixel measures functional group)."""
    sources = [ds]
    item = functional_item(ds, "PixelMeasuresSequence")
    if item is not None:
        sources.append(item)
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        for source in sources:
            value = header_number(source, keyword)
            if value is not None and value > 0:
                return abs(value)
    return None


class DicomSeries(Dataset):
    """DICOM volumes (slice series, multi-frame files) in one subfolder per class; no header value reaches the outputs."""

    name = "dicom-series"
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({3})
    Params = DicomSeriesParams

    def load(self) -> LoadedData:
        p: DicomSeriesParams = self.params
        ds_name = self.name
        check_folder(p.path, "root", ds_name)
        classes, ignored_folders = class_folders(p.path, p.classes, ds_name)

        files: list[tuple[int, str, Path, str]] = []  # (label, class, path, class/relative path)
        ignored_files = 0
        for label, cls in enumerate(classes):
            found = 0
            for path in _walk(p.path / cls):
                inside(p.path / cls, path, f"{ds_name}: a file in class folder {cls!r}")
                if _is_dicom(path):
                    files.append((label, cls, path, f"{cls}/{path.relative_to(p.path / cls).as_posix()}"))
                    found += 1
                else:
                    ignored_files += 1
            if not found:
                raise DataError(
                    f"{ds_name}: class folder {cls!r} holds no DICOM files (*.dcm, or files that start with the "
                    "DICOM prefix)"
                )
        hashes = [(rel, file_sha256(path)) for _, _, path, rel in files]
        key = pseudonym_key(h for _, h in hashes)

        # First pass: headers only, to group the files into volumes and order them.
        cases: dict[tuple[str, str], _Case] = {}
        series_class: dict[str, str] = {}
        sensitive: dict[str, str] = {}
        for label, cls, path, rel in files:
            file_id = "file-" + pseudonym(key, rel)[5:]
            sensitive |= file_name_values(rel.split("/", 1)[1], f"file name of {file_id}")
            where = f"{ds_name}: file {file_id} in class folder {cls!r}"
            header = read_dicom(path, where, header_only=True)
            with quiet_pydicom():
                item = _slice_facts(header, path, rel)
            del header
            if item.frames > 1:
                cases[("file", rel)] = _Case(label, cls, rel, [item])
                continue
            if item.series is None:
                raise DataError(f"{where}: no Series Instance UID, so the file cannot be grouped into a series")
            first_class = series_class.setdefault(item.series, cls)
            if first_class != cls:
                case = pseudonym(key, f"{first_class}/series/{item.series}")
                raise DataError(
                    f"{ds_name}: case {case} has slices in class folders {first_class!r} and {cls!r}; a series "
                    "belongs to one class"
                )
            cases.setdefault(("series", item.series), _Case(label, cls, f"{cls}/series/{item.series}")).slices.append(
                item
            )
        ordered = sorted(cases.values(), key=lambda c: (c.label, min(s.rel for s in c.slices)))
        case_ids = [pseudonym(key, c.name) for c in ordered]

        # Second pass: per volume, the full files in slice order (read, checked, then dropped).
        stamps = [[file_stamp(item.path) for item in case.slices] for case in ordered]
        facts: dict[str, Counter] = {
            k: Counter() for k in ("modality", "stored", "photometric", "window", "order", "kind", "depth")
        }
        spacings: list[tuple[float, ...] | None] = []
        slice_spacings: list[float] = []
        rescaled = declared_clean = 0
        first: tuple[tuple[int, ...], str] | None = None
        for case, case_id in zip(ordered, case_ids):
            where = f"{ds_name}: case {case_id} in class folder {case.cls!r}"
            volume, info = _volume(case, case_id, where, p, sensitive)
            declared_clean += info["clean"]
            rescaled += info["rescaled"]
            for k in ("modality", "photometric", "order", "kind"):
                facts[k][info[k]] += 1
            facts["stored"][info["stored"]] += 1
            facts["depth"][volume.shape[0]] += 1
            facts["window"]["spec" if p.window is not None else info["window_source"]] += 1
            spacings.append(info["spacing"])
            if info["spacing"] is not None:
                slice_spacings.append(info["spacing"][0])
            if p.shape is None and first is not None and volume.shape != first[0]:
                raise DataError(
                    f"{where} is {_fmt(volume.shape)} (D x H x W) but case {first[1]} is {_fmt(first[0])}; set shape to "
                    "crop or pad them all"
                )
            first = first or (volume.shape, case_id)
            del volume

        sensitive = drop_public(sensitive, classes)
        shape = (1, *(p.shape or first[0]))
        labels = torch.tensor([c.label for c in ordered], dtype=torch.long)
        spacing = spacings[0] if all(s is not None for s in spacings) else None
        description = self._describe(
            p, classes, labels, shape, facts, spacings, slice_spacings, rescaled, ignored_files, ignored_folders,
            sensitive,
        )
        return LoadedData(
            images=None,
            cases=SeriesCases(p, ordered, case_ids, stamps, labels),
            image_shape=shape,
            labels=labels,
            case_ids=case_ids,
            class_names=list(classes),
            fingerprint=fingerprint_of(hashes, p.model_dump(mode="json", exclude={"path"})),
            description=description,
            spacing=spacing,
            sensitive_values=sensitive,
            # Burned-in text is not removed (DICOM PS3.15 E.3.1), as in dicom-folder.
            pixels_may_identify=declared_clean < len(files),
            intensity_window=(p.window[0] - p.window[1] / 2, p.window[0] + p.window[1] / 2) if p.window else None,
            intensity_unit="HU" if set(facts["modality"]) == {"CT"} else "rescaled intensity units",
        )

    def _describe(
        self, p, classes, labels, shape, facts, spacings, slice_spacings, rescaled, ignored_files, ignored_folders,
        sensitive,
    ) -> str:
        """Aggregate technical facts only; a part that happens to hold a sensitive value is dropped."""

        def counts(counter: Counter, fmt=str) -> str:
            return ", ".join(f"{fmt(k)} ({v})" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))

        n, (_, d, h, w) = len(labels), shape
        per_class = Counter(labels.tolist())
        known = [s for s in spacings if s is not None]
        if p.window is not None:
            window = f"window centre {p.window[0]:g}, width {p.window[1]:g} (from the spec)"
        else:
            sources = (("the first slice's VOI LUT or Window Center/Width", "file"), ("each volume's own min-max", "minmax"))
            window = "window: " + ", ".join(f"{text} ({facts['window'][k]})" for text, k in sources if facts["window"][k])
        parts = [
            f"{self.name}: {n} DICOM volumes in {len(classes)} classes ("
            + ", ".join(f"{cls}: {per_class[i]}" for i, cls in enumerate(classes))
            + ")",
            f"1 x {d} x {h} x {w} (C x D x H x W)" + (" after centre crop/zero pad" if p.shape is not None else ""),
            counts(facts["kind"]),
            "slices per volume " + counts(facts["depth"]),
            "modality " + counts(facts["modality"]),
            "stored Rows x Columns " + counts(facts["stored"], lambda s: f"{s[0]} x {s[1]}"),
            "photometric " + counts(facts["photometric"]),
            "slices ordered by " + counts(facts["order"]),
            (
                f"slice spacing {min(slice_spacings):.4g} to {max(slice_spacings):.4g} mm"
                if slice_spacings
                else "no slice spacing"
            ),
            (
                f"spacing {_fmt(known[0], '{:.4g}')} mm (D x H x W)"
                + ("" if len(known) == len(spacings) and all(np.allclose(s, known[0], rtol=1e-4) for s in known)
                   else " of the first case with one; spacing differs between cases or is missing")
                if known
                else "no spacing"
            ),
            f"Modality LUT / rescale applied to {rescaled} volumes",
            window,
        ]
        if ignored_files:
            parts.append(f"{ignored_files} non-DICOM files ignored")
        if ignored_folders:
            parts.append(f"{ignored_folders} subfolders not in classes ignored")
        return "; ".join(part for part in parts if not leaked_values(part, sensitive))


def _volume(
    case: _Case, case_id: str, where: str, p: DicomSeriesParams, sensitive: dict[str, str] | None = None
) -> tuple[np.ndarray, dict]:
    """The windowed ``D x H x W`` float32 volume of a case and its allowlisted facts; the
    headers' identifying values go into ``sensitive`` (the load pass; a lazy read passes None).
    The load pass and the lazy cases both call it, so a case read later is what the load checked."""
    if case.multi_frame:
        ds = read_dicom(case.slices[0].path, where)
        with quiet_pydicom():
            if sensitive is not None:
                harvest(ds.file_meta, sensitive, f"case {case_id}")
                harvest(ds, sensitive, f"case {case_id}")
            values, info = read_pixels(ds, where, multi_frame=True)
            distances = _frame_distances(ds, len(values), where)
            fallback = _fallback_spacing(ds)
        order, slice_spacing, how = _order(distances, None, p.spacing_tolerance, where)
        values = values[order]
        infos = [info] * len(values)
        clean = int(str(getattr(ds, "BurnedInAnnotation", "")).strip().upper() == "NO")
        kind = "multi-frame file"
        del ds
    else:
        slices = case.slices
        if len(slices) < 2:
            raise DataError(
                f"{where}: a series of 1 slice; dicom-series reads volumes (use dicom-folder for single images)"
            )
        sizes = Counter(s.size for s in slices)
        if len(sizes) > 1:
            shown = " and ".join(f"{s[0]} x {s[1]}" if s else "unknown" for s in sorted(sizes, key=str)[:2])
            raise DataError(f"{where}: slices of different sizes in one series ({shown} Rows x Columns)")
        with quiet_pydicom():
            distances = _distances([s.position for s in slices], [s.orientation for s in slices], where)
        order, slice_spacing, how = _order(distances, [s.instance for s in slices], p.spacing_tolerance, where)
        planes, infos, clean, fallback = [], [], 0, None
        for i in order:
            ds = read_dicom(slices[i].path, where)
            with quiet_pydicom():
                if sensitive is not None:
                    harvest(ds.file_meta, sensitive, f"case {case_id}")
                    harvest(ds, sensitive, f"case {case_id}")
                plane, info = read_pixels(ds, where)
                if fallback is None:
                    fallback = _fallback_spacing(ds)
            clean += str(getattr(ds, "BurnedInAnnotation", "")).strip().upper() == "NO"
            if planes and plane.shape != planes[0].shape:
                raise DataError(f"{where}: slices of different sizes in one series (decoded pixel data)")
            planes.append(plane)
            infos.append(info)
            del ds
        values = np.stack(planes)
        kind = "single-frame series"
    pixel = [tuple(i["spacing"]) if i["spacing"] is not None else None for i in infos]
    if len(set(pixel)) > 1 and not (
        None not in pixel and np.allclose(pixel, pixel[0], rtol=1e-4, atol=1e-6)
    ):
        raise DataError(f"{where}: slices with different Pixel Spacing in one volume")
    if slice_spacing is None:
        slice_spacing = fallback
    voi = linear_window(*p.window) if p.window is not None else infos[0]["voi"]
    volume = voi_values(values, voi)
    for i, info in enumerate(infos):
        if info["photometric"] == "MONOCHROME1":
            volume[i] = 1.0 - volume[i]
    return volume, {
        "clean": clean,  # files declaring Burned In Annotation = NO
        "rescaled": int(any(i["rescaled"] for i in infos)),
        "modality": infos[0]["modality"],
        "photometric": infos[0]["photometric"],
        "stored": tuple(values.shape[1:]),
        "order": how,
        "kind": kind,
        "window_source": "file" if infos[0]["voi"] is not None else "minmax",
        "spacing": (float(slice_spacing), *pixel[0]) if slice_spacing is not None and pixel[0] is not None else None,
    }

def _finish(volume: np.ndarray, p: DicomSeriesParams) -> torch.Tensor:
    """A windowed volume (:func:`_volume`) as ``1 x D x H x W`` float32 in [0, 1], cropped or padded to ``shape``."""
    if p.shape is not None:
        volume = crop_or_pad(volume, p.shape)
    return torch.from_numpy(volume)[None].clamp(0.0, 1.0).contiguous()


class SeriesCases:
    """The cases of dicom-series, read one volume's files per case (pixels only: the load pass
    already collected the header values and ordered the slices, whose facts it keeps); paths and
    header facts only, so it pickles to DataLoader workers."""

    def __init__(self, p: DicomSeriesParams, cases: list[_Case], case_ids: list[str], stamps, labels: torch.Tensor):
        self.p, self.cases, self.case_ids, self.stamps, self.labels = p, list(cases), list(case_ids), stamps, labels

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        case, case_id = self.cases[i], self.case_ids[i]
        placed = f"case {case_id} in class folder {case.cls!r}"
        for item, stamp in zip(case.slices, self.stamps[i]):
            check_stamp(item.path, stamp, placed, DicomSeries.name)
        volume, _ = _volume(case, case_id, f"{DicomSeries.name}: {placed}", self.p)
        return {"image": _finish(volume, self.p), "label": self.labels[i]}


def _fmt(values, fmt: str = "{}") -> str:
    return " x ".join(fmt.format(v) for v in values)


@hookimpl
def register_datasets(register):
    register(DicomSeries)
