"""The dicom-folder dataset: pixels, windowing, errors, and no patient data in any output."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medaudit.cli import cli
from medaudit.core.errors import DataError
from medaudit.plugins.dicom import DicomFolder, DicomFolderParams, is_listed

HOSTILE_NAME = '"><img src=x onerror=alert(1)>'
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-0042-77"
FILE_STEM = "Doe_Jane_MRN-0042-77"


def load(root: Path, **params):
    return DicomFolder(DicomFolderParams(path=root, **params)).load()


def write_dicom(
    path: Path,
    pixels: np.ndarray | None = None,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    window: tuple[float, float] | None = None,
    frames: int | None = None,
    with_pixels: bool = True,
) -> Path:
    """A valid single-frame CT file (explicit VR little endian) carrying fictional patient data."""
    if pixels is None:
        pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 2000
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240131"
    ds.InstitutionName = "Fictional General Hospital"
    ds.Modality = "CT"
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "secret-private-note")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames is not None:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_private(message: str) -> None:
    for secret in ("Doe", "Jane", PATIENT_ID, "0042"):
        assert secret not in message, message


# -- pixels and windowing ---------------------------------------------------------------


def _stored_and_header(name: str):
    ds = pydicom.dcmread(get_testdata_file(name))
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float64), slope, intercept, ds


def test_ct_small_uses_rescale_then_min_max_window(tmp_path):
    (tmp_path / "ct").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct" / "img.dcm")
    data = load(tmp_path)
    assert data.images.shape == (1, 1, 128, 128) and data.images.dtype.is_floating_point
    assert data.class_names == ["ct"] and data.labels.tolist() == [0]
    stored, slope, intercept, ds = _stored_and_header("CT_small.dcm")
    assert "WindowCenter" not in ds and (slope, intercept) == (1.0, -1024.0)
    hu = stored * slope + intercept
    # pixel (0, 0): stored 175 -> -849 HU; the image spans [128, 2191] stored = [-896, 1167] HU
    assert stored[0, 0] == 175 and hu.min() == -896 and hu.max() == 1167
    assert data.images[0, 0, 0, 0].item() == pytest.approx((-849 + 896) / (1167 + 896), abs=1e-6)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    np.testing.assert_allclose(data.images[0, 0].numpy(), expected, atol=1e-6)


def test_spec_window_is_centre_and_width_in_hu(tmp_path):
    (tmp_path / "ct").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct" / "img.dcm")
    data = load(tmp_path, window=[40, 400], channels=3)
    assert data.images.shape == (1, 3, 128, 128)
    stored, slope, intercept, _ = _stored_and_header("CT_small.dcm")
    expected = np.clip((stored * slope + intercept - (40 - 200)) / 400, 0, 1)
    assert 0 < expected.mean() < 1
    for c in range(3):
        np.testing.assert_allclose(data.images[0, c].numpy(), expected, atol=1e-6)


def test_mr_small_uses_the_files_own_window(tmp_path):
    (tmp_path / "mr").mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr" / "MRfile")  # no extension, DICOM prefix
    (tmp_path / "mr" / "notes").write_text("not an image")  # no extension, not DICOM: ignored
    data = load(tmp_path)
    assert data.images.shape == (1, 1, 64, 64)
    stored, slope, intercept, ds = _stored_and_header("MR_small.dcm")
    assert (float(ds.WindowCenter), float(ds.WindowWidth), slope, intercept) == (600, 1600, 1.0, 0.0)
    # pixel (0, 0): stored 905, window [600 - 800, 600 + 800] -> (905 + 200) / 1600
    assert stored[0, 0] == 905
    assert data.images[0, 0, 0, 0].item() == pytest.approx(1105 / 1600, abs=1e-6)
    assert "1 non-DICOM files ignored" in data.description


def test_classes_order_and_size(tmp_path):
    for cls, name in (("b-ct", "CT_small.dcm"), ("a-mr", "MR_small.dcm")):
        (tmp_path / cls).mkdir()
        shutil.copy(get_testdata_file(name), tmp_path / cls / name)
    with pytest.raises(DataError, match="set size to resize") as info:
        load(tmp_path)
    assert "case-" in str(info.value) and "_small" not in str(info.value)
    data = load(tmp_path, classes=["b-ct", "a-mr"], size=64)
    assert data.images.shape == (2, 1, 64, 64) and data.class_names == ["b-ct", "a-mr"]
    assert data.labels.tolist() == [0, 1] and data.images.min() >= 0 and data.images.max() <= 1
    assert "modality CT (1), MR (1)" in data.description and "128 x 128 (1), 64 x 64 (1)" in data.description


# -- privacy ---------------------------------------------------------------------------


def test_patient_data_is_sensitive_and_never_in_ids_or_description(tmp_path):
    write_dicom(tmp_path / "normal" / f"{FILE_STEM}.dcm", window=(-24, 4000))
    write_dicom(tmp_path / "nodule" / f"{PATIENT_NAME}.dcm")
    data = load(tmp_path, classes=["normal", "nodule"])
    assert data.images.shape == (2, 1, 64, 64)
    sensitive = data.sensitive_values
    for value in (PATIENT_NAME, "Jane", PATIENT_ID, "19700101", "20240131", "Fictional General Hospital",
                  "secret-private-note", f"{FILE_STEM}.dcm", FILE_STEM, f"{PATIENT_NAME}.dcm"):
        assert value in sensitive, value
    assert "Doe" not in sensitive  # shorter than 4 characters: too common to match on
    assert not {"normal", "nodule", "CT", "MONOCHROME2"} & sensitive  # class names and coded strings
    text = " ".join(data.case_ids) + " " + data.description + " " + data.fingerprint
    assert_private(text)
    assert not any(v in text for v in sensitive)
    assert all(c.startswith("case-") for c in data.case_ids) and len(set(data.case_ids)) == 2


def test_pixels_may_identify_unless_every_file_declares_no_burned_in_text(tmp_path):
    for i in range(2):
        write_dicom(tmp_path / "normal" / f"case{i}.dcm")
    assert load(tmp_path).pixels_may_identify
    for i in range(2):
        ds = pydicom.dcmread(tmp_path / "normal" / f"case{i}.dcm")
        ds.BurnedInAnnotation = "NO" if i == 0 else "YES"
        ds.save_as(tmp_path / "normal" / f"case{i}.dcm")
    assert load(tmp_path).pixels_may_identify  # one file still may carry burned-in text
    ds.BurnedInAnnotation = "NO"
    ds.save_as(tmp_path / "normal" / "case1.dcm")
    assert not load(tmp_path).pixels_may_identify


def test_monochrome1_is_inverted_and_class_names_are_not_secret(tmp_path):
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 2000
    path = write_dicom(tmp_path / "nodule" / "a.dcm", pixels, intercept=0.0, window=(1000, 2000))
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SeriesDescription = "nodule"  # a listed attribute holding a class name
    ds.StudyDescription = "nodule follow-up"
    ds.save_as(path, enforce_file_format=True)
    data = load(tmp_path)
    np.testing.assert_allclose(data.images[0, 0].numpy(), 1 - pixels / 2000, atol=1e-6)
    assert "nodule follow-up" in data.sensitive_values and "nodule" not in data.sensitive_values


def test_profile_table_is_packaged_and_parsed():
    assert is_listed(0x00100010) and is_listed(0x00100020) and is_listed(0x0020000D)  # name, id, study uid
    assert is_listed(0x00111001) and is_listed(0x50000010) and is_listed(0x60023000)  # private, curve, overlay
    assert not is_listed(0x00080060) and not is_listed(0x00280010) and not is_listed(0x7FE00010)


def test_pydicom_warnings_do_not_escape(tmp_path, caplog):
    path = write_dicom(tmp_path / "c" / "a.dcm")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = "Doe^Jane-birthday"  # invalid DA: pydicom warns and quotes the value on reading
        ds.save_as(path, enforce_file_format=True)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(tmp_path)
    assert_private(" ".join(str(w.message) for w in caught) + caplog.text)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("text", "not a DICOM file"),
        ("truncate", "cannot decode the pixel data"),
        ("no_pixels", "no pixel data"),
        ("multi_frame", "multi-frame image (2 frames) unsupported"),
        ("empty", "holds no DICOM files"),
    ],
)
def test_bad_files_give_clear_errors_without_file_names(tmp_path, damage, message):
    write_dicom(tmp_path / "normal" / "good.dcm")
    bad = tmp_path / "nodule" / f"{FILE_STEM}.dcm"
    if damage == "text":
        bad.parent.mkdir()
        bad.write_text(f"Patient {PATIENT_NAME}, {PATIENT_ID}\n" * 20)
    elif damage == "truncate":
        data = write_dicom(bad).read_bytes()
        bad.write_bytes(data[: len(data) - 1000])
    elif damage == "no_pixels":
        write_dicom(bad, with_pixels=False)
    elif damage == "multi_frame":
        write_dicom(bad, frames=2)
    else:
        bad.parent.mkdir()
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load(tmp_path)
    text = str(info.value)
    assert "'nodule'" in text and (damage == "empty" or "case-" in text)
    assert_private(text)
    # no chained pydicom exception, whose message could quote header values, in a traceback
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


# -- end to end ------------------------------------------------------------------------


def test_end_to_end_run_leaks_no_patient_data(tmp_path, write_spec):
    from medaudit.plugins.phantom import CLASS_NAMES, PhantomParams, make_phantoms

    # phantom slices the demo model knows, stored as HU = stored - 1000 in [-1000, 0]
    images, labels, _ = make_phantoms(PhantomParams(n=24, size=64, seed=0))
    root = tmp_path / "data"
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        stored = np.round(image[0].numpy() * 1000).astype(np.uint16)
        hostile = HOSTILE_NAME if i == 0 else ""  # a file name is data too: it must never reach the report
        write_dicom(root / CLASS_NAMES[label] / f"{FILE_STEM}_{i:02d}{hostile}.dcm", stored, intercept=-1000.0)
    data = (
        "data:\n  dataset: dicom-folder\n"
        f"  params: {{path: {root}, classes: [normal, nodule], window: [-500, 1000]}}"
    )
    spec = write_spec(
        # the demo classifier (1 channel, 64 x 64, classes normal/nodule), briefly trained to keep the test fast
        model="model:\n  loader: demo\n  params: {train_size: 64, epochs: 2}",
        data=data,
        attacks="attacks:\n  - name: fgsm",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 1/255]",
        acceptance="acceptance:\n  criteria:\n"
        "    - {id: AC-01, metric: clean_accuracy, op: '>=', threshold: 0.5, severity: advisory}",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(spec), "-q", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"report.html", "results.json", "spec.resolved.yaml"} <= {p.name for p in files}
    long_secrets = (PATIENT_ID.encode(), b"0042-77", FILE_STEM.encode(), b"Fictional General", b"secret-private",
                    b"19700101", b"20240131", b"onerror")
    # no Burned In Annotation = NO in the files: no example images kept, none shown
    assert not [p for p in files if p.parent.name == "examples" and not p.name.endswith(".features.pt")]
    [results] = [p for p in files if p.name == "results.json"]
    assert {f["id"] for f in json.loads(results.read_text())["figures"]} & {"examples", "grad-cam"} == set()
    for path in files:
        content = path.read_bytes()
        for secret in long_secrets:  # in every byte, images and tensors included
            assert secret not in content, (path.relative_to(out), secret)
        for text in readable_text(content):  # 3-4 byte names would match by chance inside binary data
            for secret in (b"Doe", b"Jane") + long_secrets:
                assert secret not in text, (path.relative_to(out), secret)
    assert_private(result.output)


DATA_URI = re.compile(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=]+)")


def readable_text(content: bytes) -> list[bytes]:
    """The parts of an output file that hold text rather than opaque binary data: the file with
    its base64 data URIs removed, the text chunks of PNG images (in the file or in a data URI),
    and the pickles of torch's zip archives (where any string would be)."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        parts, pos = [], 8
        while pos + 8 <= len(content):
            length, kind = struct.unpack(">I4s", content[pos : pos + 8])
            data = content[pos + 8 : pos + 8 + length]
            if kind == b"zTXt":
                key, _, rest = data.partition(b"\0")
                data = key + b"\0" + zlib.decompress(rest[1:])
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                parts.append(data)
            pos += 12 + length
        return parts
    if content.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    parts = [DATA_URI.sub(b"", content)]
    for match in DATA_URI.finditer(content):
        parts += readable_text(base64.b64decode(match.group(1)))
    return parts
