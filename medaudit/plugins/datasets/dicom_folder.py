"""Datasets: dicom-folder.

Single-frame DICOM images in one subfolder per class; the reading helpers are in
:mod:`._dicom`.

Layout: ``path/<class>/<file>``, one subfolder per class (sorted by name unless the
``classes`` param lists them in order), each holding single-frame greyscale DICOM files:
``*.dcm``, and files without an extension that start with the DICOM prefix (``DICM``
after the 128-byte preamble). Files are read with pydicom without ``force``, so a file
that is not a DICOM Part 10 file is an error, not a guess. Subfolders are not searched.

Pixels: stored values go through the Modality LUT (Rescale Slope and Intercept, or a
Modality LUT Sequence), so CT images are in HU, then through a VOI transform to [0, 1]
(pydicom's ``apply_voi_lut``, :func:`voi_values`). With the ``window`` param
``[centre, width]`` that is the linear window ``[centre - width / 2, centre + width / 2]``
with clipping (LINEAR_EXACT, PS3.3 C.11.2.1.3.2). Without it, the file's own VOI: its VOI
LUT Sequence (first item, scaled by the LUT's bit depth), else its Window Center and Width
(the first pair) with its VOI LUT Function (LINEAR when absent, LINEAR_EXACT or SIGMOID),
also from an enhanced file's Frame VOI LUT functional group; else (or when pydicom cannot
apply it) the image's own min and max. MONOCHROME1 images are inverted after windowing, so bright always means a
high value as displayed. ``size`` resizes (bilinear, antialiased) after windowing;
without it every image must have the same Rows and Columns.

Privacy. Case ids are pseudonyms (:func:`medaudit.core.privacy.pseudonym` of
``class/file name``), and the description holds only aggregate technical facts from an
allowlist (counts of Modality defined terms, Rows x Columns, Bits Stored, Photometric
Interpretation, and the range of Pixel Spacing). No header value of any other attribute
is logged, stored or put in a message: errors name the case by its pseudonym and its
class folder, and say what is wrong without quoting pydicom's message. pydicom's own
warnings and log records are silenced while a file is read, since they can quote values.

:attr:`LoadedData.sensitive_values` collects, from every file read (file meta included,
and inside sequences at any depth):

* the values of every attribute listed in the PS3.15 table, of every private attribute
  (odd group) and of everything nested in a listed or private sequence, when the VR is
  text-like: PN, LO, SH, LT, ST, UT, UC, UR, AE, AS, DA, DT, TM, UI; and UN values that
  decode to printable text. CS (coded strings such as ``ORIGINAL``), DS and IS (decimal
  and integer strings such as a weight of ``70.5``) and the binary VRs are left out,
  because their values collide with innocent text of the report;
* each value stripped of spaces and NULs, each backslash-separated item of a multi-value,
  and for PN and UN each ``^``- or ``=``-separated name component, kept when it is at
  least 4 characters long (shorter strings match too much innocent text), holds a letter
  or digit and is not one character repeated (dummy values such as ``000000``);
* each file's name and stem (relative to its class folder), under the same rule.

Class folder names are not collected: they are the class names shown in the report, so a
value that is part of a class name is dropped too. The run refuses to write an output that
holds a collected value. Burned-in text in the pixels is not removed: unless every file
declares Burned In Annotation = NO, :attr:`LoadedData.pixels_may_identify` is set and the
run keeps no example images.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import F, torch
from medaudit.core.models import file_sha256
from medaudit.core.privacy import drop_public, file_name_values, pseudonym, pseudonym_key
from medaudit.plugins.datasets._dicom import (
    DicomClassFolderParams,
    harvest,
    has_dicom_prefix,
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
    file_stamp,
    fingerprint_of,
    inside,
)

def is_dicom_candidate(path: Path) -> bool:
    """``*.dcm``, or a file without an extension that starts with the DICOM prefix."""
    return path.suffix.lower() == ".dcm" or (not path.suffix and has_dicom_prefix(path))


class DicomFolderParams(DicomClassFolderParams):
    path: InputPath = Field(
        description="Root folder with one subfolder per class, each holding single-frame DICOM files (*.dcm, or "
        "files without an extension that start with the DICOM prefix); not searched recursively."
    )
    size: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="Resize every image to size x size (bilinear, antialiased, after windowing). None: all images "
        "must have the same Rows and Columns.",
    )
    channels: Literal[1, 3] = Field(1, description="Channels of the output: 1, or 3 (the grey image repeated).")


def _image(values, info: dict, p: DicomFolderParams) -> torch.Tensor:
    """One image after the Modality LUT (:func:`read_pixels`) as ``C x H x W`` float32 in [0, 1]:
    windowed, MONOCHROME1 inverted, resized and repeated to ``channels``. The load pass and the
    lazy cases both call it, so a case read later is what the load checked."""
    voi = linear_window(*p.window) if p.window is not None else info["voi"]
    image = voi_values(values, voi)
    if info["photometric"] == "MONOCHROME1":
        image = 1.0 - image
    x = torch.from_numpy(image)[None]
    if p.size is not None and tuple(x.shape[1:]) != (p.size, p.size):
        x = F.interpolate(x[None], size=(p.size, p.size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.expand(p.channels, -1, -1).clamp(0.0, 1.0).contiguous()


class DicomFileCases:
    """The cases of dicom-folder, read one file per case (pixels only: the load pass already
    collected the header values); paths and params only, so it pickles to DataLoader workers."""

    def __init__(self, p: DicomFolderParams, paths: list[Path], stamps, wheres: list[str], labels: torch.Tensor):
        self.p, self.paths, self.stamps, self.wheres, self.labels = p, list(paths), list(stamps), list(wheres), labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, where = self.paths[i], f"{DicomFolder.name}: {self.wheres[i]}"
        check_stamp(path, self.stamps[i], self.wheres[i], DicomFolder.name)
        ds = read_dicom(path, where)
        with quiet_pydicom():
            values, info = read_pixels(ds, where)
            return {"image": _image(values, info, self.p), "label": self.labels[i]}


class DicomFolder(Dataset):
    """Single-frame DICOM images in one subfolder per class; header values never reach the outputs."""

    name = "dicom-folder"
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({2})
    Params = DicomFolderParams

    def load(self) -> LoadedData:
        p: DicomFolderParams = self.params
        ds_name = self.name
        check_folder(p.path, "root", ds_name)
        classes, ignored_folders = class_folders(p.path, p.classes, ds_name)

        # First pass: list and hash the files, so errors can name cases by their pseudonym.
        files: list[tuple[int, str, Path]] = []  # (label, class, path)
        ignored_files = 0
        for label, cls in enumerate(classes):
            folder = p.path / cls
            found = 0
            for f in sorted(folder.iterdir(), key=lambda f: f.name):
                if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
                    continue
                inside(folder, f, f"{ds_name}: a file in class folder {cls!r}")
                if is_dicom_candidate(f):
                    files.append((label, cls, f))
                    found += 1
                else:
                    ignored_files += 1
            if not found:
                raise DataError(
                    f"{ds_name}: class folder {cls!r} holds no DICOM files (*.dcm, or files without an extension "
                    "that start with the DICOM prefix)"
                )
        hashes = [(f"{cls}/{f.name}", file_sha256(f)) for _, cls, f in files]
        key = pseudonym_key(h for _, h in hashes)
        case_ids = [pseudonym(key, rel) for rel, _ in hashes]

        sensitive: dict[str, str] = {}
        wheres: list[str] = []
        stamps = [file_stamp(path) for _, _, path in files]
        facts: dict[str, Counter] = {k: Counter() for k in ("modality", "stored", "bits", "photometric", "window")}
        spacings: list[float] = []
        no_spacing = rescaled = declared_clean = 0
        first: tuple[tuple[int, int], str] | None = None
        for (label, cls, path), case in zip(files, case_ids):
            wheres.append(f"case {case} in class folder {cls!r}")  # names the case, never the file
            where = f"{ds_name}: {wheres[-1]}"
            sensitive |= file_name_values(path.name, f"file name of case {case}")
            ds = read_dicom(path, where)
            with quiet_pydicom():
                harvest(ds.file_meta, sensitive, f"case {case}")
                harvest(ds, sensitive, f"case {case}")
                values, info = read_pixels(ds, where)
            declared_clean += str(getattr(ds, "BurnedInAnnotation", "")).strip().upper() == "NO"
            facts["modality"][info["modality"]] += 1
            facts["stored"][values.shape] += 1
            facts["bits"][info["bits"]] += 1
            facts["photometric"][info["photometric"]] += 1
            rescaled += info["rescaled"]
            if info["spacing"] is None:
                no_spacing += 1
            else:
                spacings += info["spacing"]

            facts["window"]["spec" if p.window is not None else ("file" if info["voi"] is not None else "minmax")] += 1
            x = _image(values, info, p)
            if p.size is None and first is not None and tuple(x.shape[1:]) != first[0]:
                (h0, w0), case0 = first
                raise DataError(
                    f"{where} is {x.shape[1]} x {x.shape[2]} (Rows x Columns) but case {case0} is {h0} x {w0}; "
                    "set size to resize them all"
                )
            first = first or (tuple(x.shape[1:]), case)
            del ds, values, x

        # Class names are shown in the report anyway: a value they contain is no secret, and keeping it
        # would make the run refuse to write its own class names.
        sensitive = drop_public(sensitive, classes)
        labels = torch.tensor([label for label, _, _ in files], dtype=torch.long)
        fingerprint = fingerprint_of(hashes, p.model_dump(mode="json", exclude={"path"}))
        shape = (p.channels, p.size, p.size) if p.size is not None else (p.channels, *first[0])
        description = self._describe(
            p, classes, labels, shape, facts, spacings, no_spacing, rescaled, ignored_files, ignored_folders, sensitive
        )
        return LoadedData(
            images=None,
            cases=DicomFileCases(p, [path for _, _, path in files], stamps, wheres, labels),
            image_shape=shape,
            labels=labels,
            case_ids=case_ids,
            class_names=list(classes),
            fingerprint=fingerprint,
            description=description,
            sensitive_values=sensitive,
            # Burned-in text is not removed: example images stay out of the report unless every
            # file declares Burned In Annotation = NO (DICOM PS3.15 E.3.1).
            pixels_may_identify=declared_clean < len(files),
            intensity_window=(p.window[0] - p.window[1] / 2, p.window[0] + p.window[1] / 2) if p.window else None,
            intensity_unit="HU" if set(facts["modality"]) == {"CT"} else "rescaled intensity units",
        )

    def _describe(
        self, p, classes, labels, shape, facts, spacings, no_spacing, rescaled, ignored_files, ignored_folders, sensitive
    ) -> str:
        """Aggregate technical facts only; a part that happens to contain a sensitive value is dropped."""

        def counts(counter: Counter, fmt=str) -> str:
            return ", ".join(f"{fmt(k)} ({v})" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))

        n, (c, h, w) = len(labels), shape
        per_class = Counter(labels.tolist())
        windows = facts["window"]
        if p.window is not None:
            window = f"window centre {p.window[0]:g}, width {p.window[1]:g} (from the spec)"
        else:
            sources = (("each file's own VOI LUT or Window Center/Width", "file"), ("each image's own min-max", "minmax"))
            window = "window: " + ", ".join(f"{text} ({windows[k]})" for text, k in sources if windows[k])
        parts = [
            f"{self.name}: {n} single-frame DICOM images in {len(classes)} classes ("
            + ", ".join(f"{cls}: {per_class[i]}" for i, cls in enumerate(classes))
            + ")",
            f"{c} x {h} x {w}" + (f" (resized to {p.size} x {p.size})" if p.size is not None else ""),
            "modality " + counts(facts["modality"]),
            "stored Rows x Columns " + counts(facts["stored"], lambda s: f"{s[0]} x {s[1]}"),
            "bits stored " + counts(facts["bits"], lambda b: "unknown" if b is None else str(b)),
            "photometric " + counts(facts["photometric"]),
            (f"pixel spacing {min(spacings):.4g} to {max(spacings):.4g} mm" if spacings else "no pixel spacing")
            + (f" ({no_spacing} images without one)" if spacings and no_spacing else ""),
            f"Modality LUT / rescale applied to {rescaled} images",
            window,
        ]
        if ignored_files:
            parts.append(f"{ignored_files} non-DICOM files ignored")
        if ignored_folders:
            parts.append(f"{ignored_folders} subfolders not in classes ignored")
        return "; ".join(part for part in parts if not any(v in part for v in sensitive))


@hookimpl
def register_datasets(register):
    register(DicomFolder)
