"""Bad inputs the dataset plugins must survive (issue 13, items 7 to 10): data files reached
through links that leave their folder, NIfTI headers that announce huge volumes, mixed
orientations, spacings and image/label geometry, the two meanings of ``window``, the file's
own VOI transform in DICOM, and file names that the privacy guard must (not) refuse."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from medaudit.cli import cli
from medaudit.core.errors import DataError
from medaudit.core.host import get_host
from tests.conftest import spec_text
from tests.plugins.datasets.test_dicom import write_dicom


@pytest.fixture(scope="module")
def host():
    return get_host(load_entry_points=False)


def load(host, name, **params):
    cls = host.get("dataset", name)
    return cls(cls.Params.model_validate(params)).load()


def refusal(host, name, **params) -> str:
    with pytest.raises(DataError) as info:
        load(host, name, **params)
    return str(info.value)


def png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path


# -- item 7: data files must stay inside their folder -------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every data root, holding files a link could reach."""
    folder = tmp_path / "elsewhere"
    png(folder / "secret.png", 7)
    png(folder / "cls" / "secret.png", 7)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(folder / "secret.nii"))
    write_dicom(folder / "secret.dcm")
    return folder


def test_a_csv_row_through_a_link_out_of_the_images_folder_is_refused(host, tmp_path, outside):
    png(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "root").symlink_to(outside, target_is_directory=True)
    (tmp_path / "labels.csv").write_text("file,label\na.png,0\nroot/secret.png,1\n")
    message = refusal(host, "image-csv", images=tmp_path / "images", labels_csv=tmp_path / "labels.csv")
    assert "line 3" in message and "outside" in message, message
    assert "secret" not in message, message


def test_a_link_that_stays_inside_the_images_folder_is_read(host, tmp_path):
    png(tmp_path / "images" / "sub" / "a.png")
    png(tmp_path / "images" / "b.png")
    (tmp_path / "images" / "alias").symlink_to(tmp_path / "images" / "sub", target_is_directory=True)
    (tmp_path / "labels.csv").write_text("file,label\nalias/a.png,0\nb.png,1\n")
    data = load(host, "image-csv", images=tmp_path / "images", labels_csv=tmp_path / "labels.csv",
                ignore_unlisted=True)
    assert len(data) == 2


@pytest.mark.parametrize("dataset", ["image-folder", "image-mask-folder", "nifti", "dicom-folder", "dicom-series"])
def test_folder_datasets_refuse_links_out_of_their_root(host, tmp_path, outside, dataset):
    root = tmp_path / "data"
    if dataset == "image-folder":
        png(root / "a" / "x.png")
        (root / "b").symlink_to(outside / "cls", target_is_directory=True)  # a class folder elsewhere
        params = {"path": root}
    elif dataset == "image-mask-folder":
        png(root / "img" / "x.png"), png(root / "msk" / "x.png", 0), png(root / "msk" / "y.png", 0)
        (root / "img" / "y.png").symlink_to(outside / "secret.png")
        params = {"images": root / "img", "masks": root / "msk"}
    elif dataset == "nifti":
        write_nii(root / "vol" / "x.nii", np.zeros((4, 4, 4), np.float32))
        for name in ("x", "y"):
            write_nii(root / "lab" / f"{name}.nii", np.zeros((4, 4, 4), np.uint8))
        (root / "vol" / "y.nii").symlink_to(outside / "secret.nii")
        params = {"images": root / "vol", "labels": root / "lab"}
    else:
        write_dicom(root / "a" / "x.dcm")
        (root / "a" / "y.dcm").symlink_to(outside / "secret.dcm")
        params = {"path": root}
    message = refusal(host, dataset, **params)
    assert "outside" in message and "secret" not in message, message


# -- item 8: NIfTI size cap, orientation, geometry, per-case spacing ------------------------


def write_nii(path: Path, array, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def bomb(path: Path, dims=(30000, 30000, 30000)) -> Path:
    """A NIfTI file whose header announces ``dims`` float32 voxels but holds a few bytes of data."""
    write_nii(path.with_suffix(".tmp.nii"), np.zeros((2, 2, 2), np.float32))
    raw = bytearray(path.with_suffix(".tmp.nii").read_bytes())
    path.with_suffix(".tmp.nii").unlink()
    raw[40:56] = struct.pack("<8h", 3, *dims, 1, 1, 1, 1)  # dim[0..7]
    path.write_bytes(bytes(raw) if path.suffix == ".nii" else gzip.compress(bytes(raw)))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_announcing_a_huge_volume_is_refused_before_reading(host, tmp_path, suffix):
    bomb(tmp_path / "vol" / f"x{suffix}")
    write_nii(tmp_path / "lab" / "x.nii", np.zeros((2, 2, 2), np.uint8))
    message = refusal(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab")
    assert "max_voxels" in message and "27000000000000" in message.replace(",", ""), message


def test_the_voxel_cap_is_a_param(host, tmp_path):
    write_nii(tmp_path / "vol" / "x.nii", np.zeros((8, 8, 8), np.float32))
    write_nii(tmp_path / "lab" / "x.nii", np.zeros((8, 8, 8), np.uint8))
    assert "max_voxels" in refusal(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab", max_voxels=500)
    assert len(load(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab", max_voxels=512)) == 1


def asymmetric():
    """An (X, Y, Z) volume and label map that change under any flip."""
    vol = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[0, 1, 2] = 1
    return vol, lab


def test_a_flipped_orientation_reads_like_the_canonical_one(host, tmp_path):
    vol, lab = asymmetric()
    for name, flip, affine in (("ras", False, np.eye(4)), ("las", True, np.diag([-1.0, 1.0, 1.0, 1.0]))):
        affine = affine.copy()
        affine[0, 3] = 5.0 if flip else 0.0  # the same voxels in the world
        write_nii(tmp_path / name / "vol" / "x.nii", vol[::-1] if flip else vol, affine)
        write_nii(tmp_path / name / "lab" / "x.nii", lab[::-1] if flip else lab, affine)
    a, b = (load(host, "nifti", images=tmp_path / n / "vol", labels=tmp_path / n / "lab") for n in ("ras", "las"))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


def test_an_image_and_label_map_of_different_geometry_are_refused(host, tmp_path):
    vol, lab = asymmetric()
    write_nii(tmp_path / "vol" / "Doe_John.nii", vol)
    moved = np.eye(4)
    moved[:3, 3] = [10.0, 0.0, 0.0]
    write_nii(tmp_path / "lab" / "Doe_John.nii", lab, moved)
    message = refusal(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab")
    assert "case-" in message and "affine" in message and "Doe" not in message, message


class Threshold(torch.nn.Module):
    """A segmentation 'model' that predicts class 1 where the input is above 0.5."""

    def forward(self, x):
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1) * 10


def test_hd95_in_mm_uses_each_cases_own_spacing(tmp_path):
    vol = np.zeros((16, 8, 8), np.float32)  # (X, Y, Z)
    vol[4:8, 2:6, 2:6] = 1.0  # the prediction
    lab = np.zeros((16, 8, 8), np.uint8)
    lab[6:10, 2:6, 2:6] = 1  # the truth: 2 voxels along X from the prediction
    for name, x_mm in (("a", 1.0), ("b", 3.0)):
        write_nii(tmp_path / "vol" / f"{name}.nii", vol, np.diag([x_mm, 1.0, 1.0, 1.0]))
        write_nii(tmp_path / "lab" / f"{name}.nii", lab, np.diag([x_mm, 1.0, 1.0, 1.0]))
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(
        data=f"data:\n  dataset: nifti\n  params: {{images: {tmp_path / 'vol'}, labels: {tmp_path / 'lab'}}}",
        model="model:\n  loader: factory\n  params: {factory: 'tests.faults.test_faults_inputs:Threshold', classes: 2, "
              "mean: [0.0], std: [1.0]}",
        threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 1/255]",
        attacks="attacks:\n  - name: fgsm",
        acceptance="acceptance:\n  criteria:\n    - {id: AC-01, metric: clean_dice, op: '>=', threshold: 0.01}",
        audit="audit:\n  name: spacing\n  title: Spacing",
        task="task: segmentation",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 2\n  seed: 0\n  output_dir: {tmp_path / 'out'}",
    ))
    result = CliRunner().invoke(cli, ["run", str(spec), "-q"])
    assert result.exit_code in (0, 1), result.output
    [records] = [p for p in (tmp_path / "out").rglob("*.jsonl") if "clean" in p.name]
    hd95 = sorted(row["clean_hd95"][1] for row in map(json.loads, records.read_text().splitlines()))
    assert hd95 == pytest.approx([2.0, 6.0]), hd95


# -- item 9: one meaning per window name; the file's own VOI transform ----------------------


def test_nifti_window_is_refused_with_a_migration_message(host, tmp_path):
    vol, lab = asymmetric()
    write_nii(tmp_path / "vol" / "x.nii", vol)
    write_nii(tmp_path / "lab" / "x.nii", lab)
    with pytest.raises(ValueError, match="intensity_range"):
        load(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab", window=[0, 100])
    data = load(host, "nifti", images=tmp_path / "vol", labels=tmp_path / "lab", intensity_range=[0, 100])
    assert data.images.max().item() == 1.0 and data.images[0, 0, 0, 0, 1].item() == pytest.approx(0.2)
    assert data.intensity_window == (0.0, 100.0)


def dicom_pixels() -> np.ndarray:
    return (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 8) % 2000


def test_dicom_sigmoid_window_is_applied(host, tmp_path):
    path = write_dicom(tmp_path / "a" / "x.dcm", dicom_pixels(), intercept=0.0, window=(1000, 400))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.VOILUTFunction = "SIGMOID"
    ds.save_as(path)
    data = load(host, "dicom-folder", path=tmp_path)
    expected = 1 / (1 + np.exp(-4 * (dicom_pixels().astype(np.float64) - 1000) / 400))
    np.testing.assert_allclose(data.images[0, 0].numpy(), expected, atol=1e-6)


def test_dicom_voi_lut_sequence_is_applied(host, tmp_path):
    path = write_dicom(tmp_path / "a" / "x.dcm", dicom_pixels(), intercept=0.0)
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(path)
    lut = Dataset()
    lut.add_new(0x00283002, "US", [1024, 500, 16])  # LUT Descriptor: 1024 entries from stored value 500, 16 bits
    table = ((np.arange(1024) / 1023.0) ** 2 * 65535).astype(np.uint16)  # a curve, not a window
    lut.add_new(0x00283006, "US", table.tolist())  # LUT Data
    ds.VOILUTSequence = Sequence([lut])
    ds.save_as(path)
    data = load(host, "dicom-folder", path=tmp_path)
    index = np.clip(dicom_pixels().astype(np.int64) - 500, 0, 1023)
    np.testing.assert_allclose(data.images[0, 0].numpy(), table[index] / 65535.0, atol=1e-6)


# -- item 10: the privacy guard on ordinary file names ------------------------------------


class Tiny(torch.nn.Module):
    """A classifier 'model' that calls bright images class 1."""

    def forward(self, x):
        m = x.mean((1, 2, 3))[:, None]
        return torch.cat([0.5 - m, m - 0.5], 1) * 10


def png_audit(tmp_path: Path, names: list[str], title: str = "PNG audit") -> tuple[int, str, Path]:
    for i, stem in enumerate(names):
        png(tmp_path / "data" / ("dark" if i % 2 else "bright") / f"{stem}.png", 40 if i % 2 else 220, size=16)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(
        audit=f"audit:\n  name: png\n  title: {title}",
        data=f"data:\n  dataset: image-folder\n  params: {{path: {tmp_path / 'data'}, classes: [dark, bright]}}",
        model="model:\n  loader: factory\n  params: {factory: 'tests.faults.test_faults_inputs:Tiny', classes: 2, "
              "mean: [0.0], std: [1.0]}",
        attacks="attacks:\n  - name: fgsm",
        runtime=f"runtime:\n  device: cpu\n  batch_size: 64\n  seed: 0\n  output_dir: {tmp_path / 'out'}",
    ))
    result = CliRunner().invoke(cli, ["run", str(spec), "-q"])
    return result.exit_code, result.output, tmp_path / "out"


@pytest.mark.parametrize(
    "names",
    [[str(year) for year in range(2000, 2032)], ["summary", "signature", "robust", "report", "clean", "attack"]],
    ids=["years", "report-words"],
)
def test_ordinary_file_names_do_not_stop_the_audit(tmp_path, names):
    code, output, out = png_audit(tmp_path, names)
    assert code in (0, 1), output
    assert list(out.rglob("report.html")) and list(out.rglob("results.json")), output


def test_an_identifying_file_name_in_the_spec_is_refused_before_the_jobs(tmp_path):
    code, output, out = png_audit(tmp_path, ["Doe_John_123456", "b-image", "c-image", "d-image"],
                                  title="Review of Doe_John_123456")
    assert code == 4, output
    message = " ".join(output.split())
    assert "refused to start the run" in message and "file name of case case-" in message, output
    assert "DICOM" not in message and "Doe" not in message and "123456" not in message, output
    assert not list(out.rglob("records")), "no job ran"
