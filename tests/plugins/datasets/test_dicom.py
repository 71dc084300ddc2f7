"""The dicom-folder and dicom-series datasets: pixels, windowing, slice order, errors, and no patient
data in any output."""

from __future__ import annotations

import base64
import copy
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
import torch
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medaudit.cli import cli
from medaudit.core.errors import DataError
from medaudit.plugins.datasets._dicom import is_listed
from medaudit.plugins.datasets.dicom_folder import DicomFolder, DicomFolderParams

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
    # pixel (0, 0): stored 905; the file's window has no VOI LUT Function, so LINEAR (PS3.3
    # C.11.2.1.2.1): (x - (c - 0.5)) / (w - 1) + 0.5
    assert stored[0, 0] == 905
    assert data.images[0, 0, 0, 0].item() == pytest.approx((905 - 599.5) / 1599 + 0.5, abs=1e-6)
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
    assert not {"normal", "nodule", "CT", "MONOCHROME2"} & sensitive.keys()  # class names and coded strings
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
    # the file's window is LINEAR (PS3.3 C.11.2.1.2.1): (x - (c - 0.5)) / (w - 1) + 0.5, clipped
    linear = np.clip((pixels - 999.5) / 1999 + 0.5, 0, 1)
    np.testing.assert_allclose(data.images[0, 0].numpy(), 1 - linear, atol=1e-6)
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
    from medaudit.plugins.datasets.phantom import CLASS_NAMES, PhantomParams, make_phantoms

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


# -- dicom-series: volumes from series of slices and multi-frame files -----------------------


def load_series(root: Path, **params):
    from medaudit.plugins.datasets.dicom_series import DicomSeries, DicomSeriesParams

    return DicomSeries(DicomSeriesParams(path=root, **params)).load()


def ct_series(folder: Path, zs, *, uid=None, instances=None, name="slice{i}.dcm", edit=None) -> str:
    """Copies of CT_small.dcm as one series, slice i at z = zs[i] with stored pixel (0, 0) = 100 * i."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i, z in enumerate(zs):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.InstanceNumber = (instances or list(range(1, len(zs) + 1)))[i]
        x, y, _ = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, float(z)]
        pixels = source.pixel_array.copy()
        pixels[0, 0] = 100 * i
        ds.PixelData = pixels.tobytes()
        if edit is not None:
            edit(ds, i)
        ds.save_as(folder / name.format(i=i))
    return uid


def test_series_are_sorted_by_position_and_windowed(tmp_path):
    # file names and instance numbers run against the positions: only the positions give the order
    ct_series(tmp_path / "normal" / "a", [10.0, 5.0, 0.0, 15.0], instances=[4, 1, 3, 2])
    ct_series(tmp_path / "nodule", [-2.5, 0.0, 2.5])
    ct_series(tmp_path / "nodule" / "deeper", [7.5, 2.5, 5.0], name="x{i}")  # no extension, DICOM prefix
    (tmp_path / "nodule" / "readme.txt").write_text("not DICOM")
    data = load_series(tmp_path, classes=["normal", "nodule"], window=[40, 400], shape=[4, 128, 128])
    assert data.images.shape == (3, 1, 4, 128, 128) and data.images.dtype == torch.float32
    assert data.class_names == ["normal", "nodule"] and data.labels.tolist() == [0, 1, 1]
    hu = lambda stored: np.clip((stored - 1024 - (40 - 200)) / 400, 0, 1)  # noqa: E731  (CT_small: HU = stored - 1024)
    # case 0 sorted by z: slices written as i = 2, 1, 0, 3 -> pixel (0, 0) = 200, 100, 0, 300 stored
    assert data.images[0, 0, :, 0, 0].tolist() == pytest.approx(hu(np.array([200, 100, 0, 300])).tolist(), abs=1e-6)
    expected = hu(pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64))
    np.testing.assert_allclose(data.images[0, 0, 1, 5:, 5:].numpy(), expected[5:, 5:], atol=1e-6)
    # cases sorted by their first file: nodule/deeper/x0 before nodule/slice0.dcm
    assert data.images[1, 0, :3, 0, 0].tolist() == pytest.approx(hu(np.array([100, 200, 0])).tolist(), abs=1e-6)
    # 3 slices padded to 4 (centre pad: the zero slice goes after them), z = -2.5, 0, 2.5
    assert data.images[2, 0, 3].abs().max() == 0 and data.images[2, 0, :3, 0, 0].tolist() == pytest.approx(
        hu(np.array([0, 100, 200])).tolist(), abs=1e-6
    )
    assert data.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert data.intensity_window == (-160, 240) and data.intensity_unit == "HU"
    text = data.description
    assert "3 DICOM volumes in 2 classes (normal: 1, nodule: 2)" in text
    assert "slices per volume 3 (2), 4 (1)" in text and "slices ordered by Image Position (Patient) (3)" in text
    assert "slice spacing 2.5 to 5 mm" in text and "1 non-DICOM files ignored" in text
    assert "single-frame series (3)" in text
    assert len(set(data.case_ids)) == 3 and all(c.startswith("case-") for c in data.case_ids)
    assert data.pixels_may_identify  # CT_small declares no Burned In Annotation
    assert "CompressedSamples^CT1" in data.sensitive_values and "deeper" in data.sensitive_values
    assert load_series(tmp_path, classes=["normal", "nodule"], window=[40, 400], shape=[4, 128, 128]).fingerprint == (
        data.fingerprint
    )
    with pytest.raises(DataError, match=r"is 4 x 128 x 128 \(D x H x W\) but case case-\w+ is 3 x 128 x 128; set shape"):
        load_series(tmp_path)


def test_oblique_series_and_instance_number_fallback(tmp_path):
    def coronal(ds, i):  # rows along x, columns along -z: the slice normal is +y
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0.0, [3.0, 1.0, 2.0][i], 0.0]

    ct_series(tmp_path / "cor", [0, 0, 0], edit=coronal)
    data = load_series(tmp_path)
    # y = 1, 2, 3 are slices i = 1, 2, 0: pixel (0, 0) stored 100, 200, 0
    assert data.images[0, 0, :, 0, 0].argsort().tolist() == [2, 0, 1] and data.spacing[0] == pytest.approx(1.0)

    shutil.rmtree(tmp_path / "cor")

    def no_position(ds, i):
        del ds.ImagePositionPatient

    ct_series(tmp_path / "cor", [0, 0, 0], instances=[3, 1, 2], edit=no_position)
    data = load_series(tmp_path)
    stored = data.images[0, 0, :, 0, 0]  # min-max window: only the order matters
    assert stored.argsort().tolist() == [2, 0, 1]  # instance 1, 2, 3 = slices i = 1, 2, 0: stored 100, 200, 0
    assert "slices ordered by Instance Number (1)" in data.description
    assert data.spacing == pytest.approx((5.0, 0.661468, 0.661468))  # Slice Thickness as the fallback


def test_multi_frame_files_are_volumes(tmp_path):
    (tmp_path / "dose").mkdir()
    shutil.copy(get_testdata_file("rtdose.dcm"), tmp_path / "dose" / "plan.dcm")  # 15 frames, Grid Frame Offset Vector
    stored = pydicom.dcmread(get_testdata_file("rtdose.dcm")).pixel_array.astype(np.float64)
    data = load_series(tmp_path)
    assert data.images.shape == (1, 1, 15, 10, 10)
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(data.images[0, 0].numpy(), expected, atol=1e-6)
    assert data.spacing == pytest.approx((5.0, 10.0, 10.0))
    assert "multi-frame file (1)" in data.description

    # an enhanced-style file: per-frame positions (stored in reverse), shared orientation and pixel measures
    path = write_dicom(tmp_path / "dose" / "enh.dcm", np.zeros((10, 10), dtype=np.uint16), frames=3)
    ds = pydicom.dcmread(path)
    pixels = np.stack([np.full((10, 10), 10 * (i + 1), dtype=np.uint16) for i in range(3)])
    ds.PixelData = pixels.tobytes()
    del ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept
    shared = DicomDataset()
    shared.PlaneOrientationSequence = [DicomDataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [DicomDataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [10, 10]
    shared.PixelValueTransformationSequence = [DicomDataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -10
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for z in (20.0, 10.0, 0.0):
        item = DicomDataset()
        item.PlanePositionSequence = [DicomDataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, z]
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    data = load_series(tmp_path, window=[40, 80], shape=[15, 10, 10])
    assert data.images.shape == (2, 1, 15, 10, 10)
    # sorted: z = 0, 10, 20 are frames 2, 1, 0 -> stored 30, 20, 10 -> 50, 30, 10 after rescale; window [0, 80]
    enhanced = data.images[0, 0, 6:9, 0, 0].tolist()  # centre-padded into 15 slices
    assert enhanced == pytest.approx([50 / 80, 30 / 80, 10 / 80])
    assert "multi-frame file (2)" in data.description and data.spacing == pytest.approx((10.0, 10.0, 10.0))


def series_error(tmp_path: Path, setup, **params) -> str:
    setup(tmp_path)
    with pytest.raises(DataError) as info:
        load_series(tmp_path, **params)
    text = str(info.value)
    assert_private(text)
    assert info.value.__cause__ is None
    return text


def _sized(ds, i):
    if i == 1:
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.zeros((64, 64), dtype=np.int16).tobytes()


def _tilted(ds, i):
    if i == 2:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _no_order(ds, i):
    del ds.ImagePositionPatient
    if i == 0:
        del ds.InstanceNumber


def _no_uid(ds, i):
    del ds.SeriesInstanceUID


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: ct_series(r / "c" / FILE_STEM, [0, 5, 10], edit=_sized), "slices of different sizes in one series"),
        (lambda r: ct_series(r / "c", [0, 5, 5, 10]), r"slices at the same position \(1 duplicate"),
        (lambda r: ct_series(r / "c", [0, 5, 15, 20]), r"uneven slice spacing \(gaps from 5 to 10 mm, median 5 mm\)"),
        (lambda r: ct_series(r / "c", [0, 5, 10], edit=_tilted), "different orientations"),
        (lambda r: ct_series(r / "c", [0, 5, 10], edit=_no_order), "slice order unknown"),
        (lambda r: ct_series(r / "c", [0]), "a series of 1 slice"),
        (lambda r: ct_series(r / "c", [0, 5], edit=_no_uid), "no Series Instance UID"),
        (lambda r: ct_series(r / "c", [0, 5], uid=ct_series(r / "d", [0, 5])), "has slices in class folders 'c' and 'd'"),
        (lambda r: (r / "c").mkdir(), "class folder 'c' holds no DICOM files"),
        (lambda r: (r / "c").mkdir() or (r / "c" / f"{FILE_STEM}.dcm").write_text(PATIENT_NAME * 30), "not a DICOM file"),
    ],
)
def test_series_errors_name_the_case_not_the_file(tmp_path, setup, message):
    text = series_error(tmp_path, setup)
    assert re.search(message, text), text
    assert "dicom-series: " in text and FILE_STEM not in text and "slice0" not in text
    if "class folder 'c' holds" not in text:
        assert re.search(r"(case|file)-[0-9a-f]{12}", text), text


def test_series_tolerance_and_missing_slices(tmp_path):
    ct_series(tmp_path / "c", [0, 5, 10.4, 15])
    assert load_series(tmp_path).images.shape == (1, 1, 4, 128, 128)  # gaps 5, 5.4, 4.6: within 10 %
    with pytest.raises(DataError, match="missing slices"):
        load_series(tmp_path, spacing_tolerance=0.05)


def test_series_patient_data_is_sensitive_and_never_in_outputs(tmp_path):
    uid = generate_uid()
    for i, z in enumerate([0.0, 2.0, 4.0]):
        path = write_dicom(tmp_path / "nodule" / "Doe_Jane_1970" / f"{FILE_STEM}_{i}.dcm", intercept=0.0)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.InstanceNumber = uid, i + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
        if i == 1:
            ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BurnedInAnnotation = "NO"
        ds.save_as(path, enforce_file_format=True)
    data = load_series(tmp_path, window=[1000, 2000])
    pixels = (np.arange(64 * 64).reshape(64, 64) % 2000) / 2000
    np.testing.assert_allclose(data.images[0, 0, 0].numpy(), pixels, atol=1e-6)
    np.testing.assert_allclose(data.images[0, 0, 1].numpy(), 1 - pixels, atol=1e-6)  # MONOCHROME1 inverted
    assert not data.pixels_may_identify  # every file declares Burned In Annotation = NO
    for value in (PATIENT_NAME, PATIENT_ID, "19700101", "secret-private-note", f"{FILE_STEM}_0.dcm",
                  "Doe_Jane_1970", uid):
        assert value in data.sensitive_values, value
    assert not {"nodule", "CT"} & data.sensitive_values.keys()
    text = " ".join(data.case_ids) + " " + data.description + " " + data.fingerprint
    assert_private(text)
    assert not any(v in text for v in data.sensitive_values)
    assert data.spacing == pytest.approx((2.0, 0.5, 0.5))
