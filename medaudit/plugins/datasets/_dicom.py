"""DICOM reading helpers shared by ``dicom-folder`` and ``dicom-series``: pydicom reads
without ``force`` and with its warnings silenced, the Modality LUT and VOI transforms to
[0, 1], and the harvest of identifying header values (see :mod:`.dicom_folder` for the
rules).

``dicom_basic_profile.tsv`` next to this module is DICOM PS3.15 Table E.1-1 (Application
Level Confidentiality Profile Attributes), rev 2024b.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import math
import re
import warnings
from collections.abc import MutableSequence
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, field_validator

from medaudit.core.errors import DataError
from medaudit.core.lazy import np
from medaudit.core.privacy import distinctive
from medaudit.plugins.datasets._files import ClassFolderParams

PROFILE_FILE = "dicom_basic_profile.tsv"

#: VRs whose values are collected as sensitive (see the module docstring).
TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "AE", "AS", "DA", "DT", "TM", "UI"})
#: VRs whose values are also split into name components.
NAME_VRS = frozenset({"PN", "UN"})

#: Modality defined terms (PS3.3 C.7.3.1.1.1) the description may count; others count as "other".
MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT "
    "IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP "
    "RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN "
    "TEXTUREMAP TG US VA XA XAPROTOCOL XC".split()
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Photometric interpretations an error message may name (defined terms of PS3.3 C.7.6.3.1.2).
PHOTOMETRIC_TERMS = frozenset(
    {"PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
     "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}
)


# -- the PS3.15 table ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def profile_tags() -> tuple[frozenset[int], tuple[tuple[int, int], ...]]:
    """Tags of the PS3.15 table: exact tags, and (mask, value) pairs for rows like ``(50XX,XXXX)``.

    The row for private attributes, ``(GGGG,EEEE) WHERE GGGG IS ODD``, is handled by
    :func:`is_listed` directly.
    """
    text = importlib.resources.files("medaudit.plugins.datasets").joinpath(PROFILE_FILE).read_text(encoding="utf-8")
    exact: set[int] = set()
    patterns: list[tuple[int, int]] = []
    for line in text.splitlines():
        if not line.startswith("("):
            continue  # comments and the header row
        tag = line.split("\t", 1)[0].strip().upper()
        match = re.fullmatch(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)", tag)
        if match is None:
            continue  # the private-attribute row
        digits = match.group(1) + match.group(2)
        if "X" not in digits:
            exact.add(int(digits, 16))
            continue
        mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
        value = int("".join("0" if c == "X" else c for c in digits), 16)
        patterns.append((mask, value))
    if not exact:
        raise RuntimeError(f"{PROFILE_FILE} lists no attributes; the package is broken")
    return frozenset(exact), tuple(patterns)


def is_listed(tag: int) -> bool:
    """Whether an attribute is private or listed in the PS3.15 table."""
    if (tag >> 16) % 2 == 1:
        return True
    exact, patterns = profile_tags()
    return tag in exact or any(tag & mask == value for mask, value in patterns)


# -- harvesting sensitive values ------------------------------------------------------------


def _add(out: dict[str, str], text: str, split_names: bool, source: str) -> None:
    for item in text.split("\\"):
        item = item.strip(" \x00\t\r\n")
        if distinctive(item):
            out.setdefault(item, source)
        if split_names:
            for part in re.split(r"[\^=]", item):
                part = part.strip(" \x00\t\r\n")
                if distinctive(part):
                    out.setdefault(part, source)


def _source(tag, case: str) -> str:
    """Where a value came from, for a privacy refusal: the attribute's keyword and tag, and the case."""
    from pydicom.datadict import keyword_for_tag
    from pydicom.tag import Tag

    tag = Tag(tag)
    keyword = keyword_for_tag(tag) or ("private attribute" if tag.is_private else "attribute")
    return f"DICOM {keyword} ({tag.group:04X},{tag.element:04X}) of {case}"


def _is_multi(value: Any) -> bool:
    """A list, tuple or pydicom MultiValue (a MutableSequence), not bytes."""
    return isinstance(value, (list, tuple, MutableSequence)) and not isinstance(value, (bytes, bytearray))


def _decoded(raw: Any) -> str | None:
    """Bytes of an unknown VR as text when they are printable, else None."""
    if not isinstance(raw, (bytes, bytearray)):
        return None
    text = bytes(raw).decode("latin-1").strip(" \x00")
    return text if text and text.isprintable() else None


def _values(value: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, (bytes, bytearray)):
        text = _decoded(value)
        if text is not None:
            yield text
    elif _is_multi(value):
        for item in value:
            yield from _values(item)
    else:
        yield str(value)


def harvest(dataset, out: dict[str, str], case: str, inherited: bool = False) -> None:
    """Add the sensitive values of ``dataset`` (and its sequences, at any depth) to ``out``,
    each mapped to its attribute and ``case`` (e.g. ``"case case-1a2b3c4d5e6f"``)."""
    for tag in list(dataset.keys()):
        listed = inherited or is_listed(int(tag))
        try:
            elem = dataset[tag]
        except Exception:  # a value pydicom cannot convert: fall back to its raw bytes
            if listed:
                with contextlib.suppress(Exception):
                    text = _decoded(dataset.get_item(tag).value)
                    if text is not None:
                        _add(out, text, split_names=True, source=_source(tag, case))
            continue
        if elem.VR == "SQ":
            for item in elem.value or ():
                harvest(item, out, case, listed)
        elif listed and (elem.VR in TEXT_VRS or elem.VR == "UN"):
            for text in _values(elem.value):
                _add(out, text, split_names=elem.VR in NAME_VRS, source=_source(tag, case))


# -- reading -----------------------------------------------------------------------------


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records, which can quote header values."""
    logger = logging.getLogger("pydicom")
    drop = _DropAll()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)


def has_dicom_prefix(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def header_number(ds, keyword: str) -> float | None:
    """First value of a numeric attribute as a finite float, or None when absent or unusable."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if _is_multi(value):
            value = value[0] if len(value) else None
        number = float(value)
    except Exception:
        return None
    return number if math.isfinite(number) else None


def header_numbers(ds, keyword: str) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        items = value if _is_multi(value) else [value]
        numbers = tuple(float(v) for v in items)
    except Exception:
        return None
    return numbers if numbers and all(math.isfinite(n) for n in numbers) else None


def header_text(ds, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    return str(value).strip() if value is not None else None


def functional_item(ds, sequence: str, frame: int = 0):
    """The first item of a functional group macro (e.g. ``PixelMeasuresSequence``) of an enhanced
    multi-frame file for ``frame``: the per-frame group's when it has one, else the shared group's."""
    for groups_kw, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            groups = ds.get(groups_kw)
            if groups and index < len(groups):
                inner = groups[index].get(sequence)
                if inner:
                    return inner[0]
        except Exception:
            continue
    return None


def read_dicom(path: Path, where: str, *, header_only: bool = False):
    """Read a DICOM Part 10 file (no ``force``); errors name the case by ``where``, never the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with quiet_pydicom():
            return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise DataError(
            f"{where}: not a DICOM file (no 'DICM' prefix after the 128-byte preamble); export it as a DICOM "
            "Part 10 file or remove it"
        ) from None
    except Exception as exc:  # pydicom raises many types for damaged files; their messages can quote values
        raise DataError(f"{where}: corrupt or truncated DICOM file ({type(exc).__name__} while parsing)") from None


def read_pixels(ds, where: str, *, multi_frame: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """The image after the Modality LUT (float64; ``H x W``, or ``F x H x W`` for a multi-frame
    file when ``multi_frame``) and the allowlisted facts of the file.

    The Modality LUT is the file's Rescale Slope/Intercept or Modality LUT Sequence, else the
    Pixel Value Transformation of an enhanced file's functional groups (per frame). Call
    inside :func:`quiet_pydicom`.
    """
    from pydicom.pixels import apply_modality_lut

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{where}: the file has no pixel data (not an image, or truncated before its pixels)")
    frames = header_number(ds, "NumberOfFrames")
    n_frames = int(frames) if frames is not None and frames >= 1 and frames == int(frames) else 1
    if n_frames > 1 and not multi_frame:
        raise DataError(f"{where}: multi-frame image ({n_frames} frames) unsupported; use single-frame files")
    samples = header_number(ds, "SamplesPerPixel")
    photometric = header_text(ds, "PhotometricInterpretation")
    if samples is not None and samples != 1:
        raise DataError(
            f"{where}: {samples:g} samples per pixel (colour) unsupported; this dataset reads greyscale images"
        )
    if photometric not in MONOCHROME:
        shown = f"{photometric} is" if photometric in PHOTOMETRIC_TERMS else "is missing or not a defined term, so"
        raise DataError(
            f"{where}: photometric interpretation {shown} unsupported; this dataset reads greyscale "
            "(MONOCHROME1/2) images"
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "") if getattr(syntax, "is_transfer_syntax", False) else ""
        raise DataError(
            f"{where}: cannot decode the pixel data ({type(exc).__name__}"
            + (f"; transfer syntax {name}" if name else "")
            + "): truncated or corrupt pixel data, or a compressed format without an installed decoder"
        ) from None
    expected = 3 if n_frames > 1 else 2
    if stored.ndim != expected or (n_frames > 1 and stored.shape[0] != n_frames):
        what = f"{n_frames} greyscale frames" if n_frames > 1 else "a single greyscale frame"
        raise DataError(f"{where}: pixel data has shape {tuple(stored.shape)}; expected {what}")
    rescaled = any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))
    try:
        if rescaled:
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        else:
            values = np.array(stored, dtype=np.float64)
            frame_values = values if n_frames > 1 else values[None]
            for i in range(len(frame_values)):
                item = functional_item(ds, "PixelValueTransformationSequence", i)
                if item is not None:
                    slope, intercept = header_number(item, "RescaleSlope"), header_number(item, "RescaleIntercept")
                    if slope is not None or intercept is not None:
                        rescaled = True
                        frame_values[i] = frame_values[i] * (1.0 if slope is None else slope) + (intercept or 0.0)
    except Exception as exc:
        raise DataError(
            f"{where}: cannot apply the Modality LUT / Rescale Slope and Intercept ({type(exc).__name__})"
        ) from None
    if not np.isfinite(values).all():
        raise DataError(f"{where}: the image contains NaN or Inf values")
    modality = header_text(ds, "Modality")
    spacing = header_numbers(ds, "PixelSpacing")
    if spacing is None:
        measures = functional_item(ds, "PixelMeasuresSequence")
        spacing = header_numbers(measures, "PixelSpacing") if measures is not None else None
    bits = header_number(ds, "BitsStored")
    return values, {
        "modality": modality if modality in MODALITIES else "other",
        "photometric": photometric,
        "bits": int(bits) if bits is not None and bits == int(bits) and 1 <= bits <= 64 else None,
        "spacing": list(spacing) if spacing is not None and len(spacing) == 2 and min(spacing) > 0 else None,
        "voi": file_voi(ds),
        "rescaled": int(rescaled),
    }


class DicomClassFolderParams(ClassFolderParams):
    """Params shared by the DICOM datasets: class folders and the intensity window."""

    window: tuple[float, float] | None = Field(
        None,
        description="Intensity window [centre, width] in the modality's units after Rescale Slope/Intercept (e.g. "
        "[40, 400] for CT in HU), mapped to [0, 1] with clipping. Default: the file's Window Center/Width (the first "
        "pair; for a series, its first slice's), else the image's own min and max.",
    )

    @field_validator("window")
    @classmethod
    def _valid_window(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        """[centre, width], finite, width > 0."""
        if value is not None and not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[1] > 0):
            raise ValueError("window must be two finite numbers [centre, width] with width > 0")
        return value


def _voi_view(ds=None, **attributes):
    """A minimal pydicom dataset holding one VOI transform, for ``apply_voi_lut``: monochrome,
    16 bits (the output range does not matter: :func:`voi_values` rescales it to [0, 1])."""
    from pydicom.dataset import Dataset

    view = Dataset()
    if ds is not None and hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # the byte order of an OW LUT Data
    view.PhotometricInterpretation, view.BitsStored, view.PixelRepresentation = "MONOCHROME2", 16, 0
    for keyword, value in attributes.items():
        setattr(view, keyword, value)
    return view


def linear_window(centre: float, width: float):
    """The spec's ``window: [centre, width]``: [centre - width / 2, centre + width / 2] to [0, 1]."""
    return _voi_view(WindowCenter=centre, WindowWidth=width, VOILUTFunction="LINEAR_EXACT")


def file_voi(ds):
    """The file's own VOI transform (see the module docstring) as a dataset for
    :func:`voi_values`; None when it has none, or one pydicom cannot apply."""
    from pydicom.sequence import Sequence

    for source in (ds, functional_item(ds, "FrameVOILUTSequence")):
        if source is None:
            continue
        if source.get("VOILUTSequence"):
            view = _voi_view(ds, VOILUTSequence=Sequence([source.VOILUTSequence[0]]))
        else:
            center, width = header_number(source, "WindowCenter"), header_number(source, "WindowWidth")
            if center is None or width is None:
                continue
            function = header_text(source, "VOILUTFunction") or "LINEAR"
            view = _voi_view(WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
        try:
            voi_values(np.zeros(1), view)
        except Exception:  # an unknown function, a width pydicom refuses, an unsupported LUT depth
            return None
        return view
    return None


def voi_values(values: np.ndarray, voi) -> np.ndarray:
    """``values`` mapped to [0, 1] by a VOI transform (:func:`linear_window`, :func:`file_voi`)
    with pydicom's ``apply_voi_lut``, or by their own min and max when ``voi`` is None
    (float32, any shape). A VOI LUT's output is divided by its largest value (2^bits - 1), a
    window's is rescaled from the range pydicom maps it to."""
    from pydicom.pixels import apply_voi_lut

    if voi is None:
        low, width = float(values.min()), float(values.max() - values.min())
        if width <= 0:
            return np.zeros(values.shape, dtype=np.float32)
        return np.clip((values - low) / width, 0.0, 1.0).astype(np.float32)
    if "VOILUTSequence" in voi:
        entries, first, bits = voi.VOILUTSequence[0].LUTDescriptor
        indices = np.clip(np.rint(values), first, first + (entries or 65536) - 1).astype(np.int64)
        out = apply_voi_lut(indices, voi) / (2.0**bits - 1)
    else:
        with np.errstate(over="ignore"):
            low, high = apply_voi_lut(np.array([-np.inf, np.inf]), voi)
            out = (apply_voi_lut(values, voi) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)

