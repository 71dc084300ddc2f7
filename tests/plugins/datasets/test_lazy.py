"""The file datasets are lazy: the load checks every file and keeps no pixels; each case is read
from its file when asked for, bit for bit what an independent decode of the same file gives, and
the case source pickles (DataLoader workers)."""

from __future__ import annotations

import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.data import get_testdata_file

from medaudit.core.errors import DataError
from medaudit.core.host import get_host
from tests.plugins.datasets.test_dicom import ct_series, write_dicom
from tests.plugins.datasets.test_segmentation_sets import labelmap, volume, write_nii


@pytest.fixture(scope="module")
def host():
    return get_host(load_entry_points=False)


def load(host, name, base, **params):
    cls = host.get("dataset", name)
    return cls(cls.Params.model_validate(params, context={"base_dir": base})).load()


def read_all(data, key="image") -> torch.Tensor:
    """Every case read through a pickled copy of the case source (as a DataLoader worker would)."""
    cases = pickle.loads(pickle.dumps(data.cases))
    return torch.stack([cases[i][key] for i in range(len(data))])


def assert_lazy(data) -> None:
    """No tensor or array of all cases is held: neither on the data nor on its case source."""
    assert data.is_lazy and data.__dict__.get("_images") is None and data.__dict__.get("_masks") is None
    for value in vars(data.cases).values():
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= 3:
            assert value.dtype not in (torch.float32, np.float32), "a float copy of the set is held"


def pil_decode(path, grayscale=True, size=None) -> torch.Tensor:
    img = Image.open(path)
    arr = np.asarray(img.convert("L" if grayscale else "RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr[None] if grayscale else arr.transpose(2, 0, 1).copy())
    if size is not None:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.clamp(0, 1)


@pytest.fixture
def class_tree(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(5):
        folder = tmp_path / "tree" / ["benign", "malignant"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return tmp_path


@pytest.mark.parametrize("grayscale, size", [(True, 9), (False, 16)])
def test_image_folder_reads_each_case_from_its_file(host, class_tree, grayscale, size):
    data = load(host, "image-folder", class_tree, path="tree", grayscale=grayscale, size=size)
    assert_lazy(data)
    files = sorted((class_tree / "tree").glob("*/*.png"), key=lambda f: (f.parent.name, f.name))
    expected = torch.stack([pil_decode(f, grayscale, size) for f in files])
    assert torch.equal(read_all(data), expected)
    assert data.image_shape == tuple(expected.shape[1:])
    assert torch.equal(data.images, expected)  # materialised on demand, for small auxiliary sets


def test_image_csv_is_lazy_and_refuses_a_file_changed_after_the_load(host, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "img" / f"x{i}.png")
    (tmp_path / "labels.csv").write_text("file,label\nx0.png,0\nx1.png,1\nx2.png,0\n")
    data = load(host, "image-csv", tmp_path, images="img", labels_csv="labels.csv")
    assert_lazy(data)
    expected = torch.stack([pil_decode(tmp_path / "img" / f"x{i}.png") for i in range(3)])
    assert torch.equal(read_all(data), expected)
    assert torch.equal(torch.cat([x for _, x, _ in data.batches(0, 3, 2, workers=2)]), expected)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "img" / "x1.png")
    assert torch.equal(data.cases[0]["image"], expected[0])
    with pytest.raises(DataError, match="x1.png changed since the data set was loaded"):
        data.cases[1]


def test_image_mask_folder_reads_images_and_masks_per_case(host, tmp_path):
    rng = np.random.default_rng(3)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (13, 15), dtype=np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray((rng.integers(0, 3, (13, 15)) * 100).astype(np.uint8)).save(tmp_path / "masks" / f"s{i}.png")
    data = load(host, "image-mask-folder", tmp_path, images="images", masks="masks", mask_values=[0, 100, 200])
    assert_lazy(data)
    assert torch.equal(read_all(data), torch.stack([pil_decode(tmp_path / "images" / f"s{i}.png") for i in range(3)]))
    masks = [torch.from_numpy(np.asarray(Image.open(tmp_path / "masks" / f"s{i}.png")).astype(np.int64) // 100)
             for i in range(3)]
    assert torch.equal(read_all(data, "mask"), torch.stack(masks))
    assert data.mask_class_names == ["class0", "class1", "class2"]


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("shape", [(12, 12), (8, 8, 3), (5, 6, 7)])
def test_medmnist_maps_or_keeps_the_stored_split_and_converts_per_case(host, tmp_path, compressed, shape):
    rng = np.random.default_rng(4)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    (np.savez_compressed if compressed else np.savez)(tmp_path / "m.npz", **arrays)
    data = load(host, "medmnist", tmp_path, path="m.npz", split="train", max_cases=4)
    assert_lazy(data)
    stored = arrays["train_images"][:4]
    stored = stored.transpose(0, 3, 1, 2) if len(shape) == 3 and shape[-1] == 3 else stored[:, None]
    expected = torch.from_numpy(stored.astype(np.float32) / 255.0)
    assert torch.equal(read_all(data), expected)
    assert (data.cases.member is not None) == (not compressed)  # an uncompressed member is memory-mapped
    assert (data.cases.stored is None) == (not compressed)
    lo, hi = float(expected.min()), float(expected.max())
    assert f"intensity range [{lo:.3g}, {hi:.3g}]" in data.description


def test_nifti_reads_each_volume_with_nibabel_per_case(host, tmp_path):
    for i, z in enumerate((6, 6, 5)):
        write_nii(tmp_path / "img" / f"c{i}.nii.gz", volume(z=z) * (i + 1), zooms=(1.0, 1.5, 2.0))
        write_nii(tmp_path / "lab" / f"c{i}.nii.gz", labelmap(z=z), zooms=(1.0, 1.5, 2.0))
    data = load(host, "nifti", tmp_path, images="img", labels="lab", intensity_range=[5, 300], shape=[6, 10, 8])
    assert_lazy(data)
    images, masks = [], []
    for i in range(3):
        vol = nib.as_closest_canonical(nib.load(tmp_path / "img" / f"c{i}.nii.gz")).get_fdata(dtype=np.float32)
        lab = np.asanyarray(nib.as_closest_canonical(nib.load(tmp_path / "lab" / f"c{i}.nii.gz")).dataobj)
        vol = np.clip((vol.transpose(2, 1, 0).astype(np.float64) - 5) / 295, 0, 1).astype(np.float32)
        lab = lab.transpose(2, 1, 0).astype(np.int64)
        pad = ((0, 6 - vol.shape[0]), (0, 0), (0, 0))  # centre pad 5 -> 6 slices: the zero slice after
        images.append(torch.from_numpy(np.pad(vol, pad))[None])
        masks.append(torch.from_numpy(np.pad(lab, pad)))
    assert torch.equal(read_all(data), torch.stack(images))
    assert torch.equal(read_all(data, "mask"), torch.stack(masks))
    assert data.image_shape == (1, 6, 10, 8)


def hu_min_max(path) -> np.ndarray:
    """A DICOM image through its Rescale Slope/Intercept and its own min-max window."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip((hu - hu.min()) / (hu.max() - hu.min()), 0, 1).astype(np.float32)


def test_dicom_folder_reads_pixels_per_case(host, tmp_path):
    (tmp_path / "ct").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct" / "a.dcm")
    write_dicom(tmp_path / "mr" / "b.dcm", (np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) * 7) % 4000)
    data = load(host, "dicom-folder", tmp_path, path=str(tmp_path), channels=3)
    assert_lazy(data)
    expected = [torch.from_numpy(hu_min_max(f))[None].expand(3, -1, -1) for f in (tmp_path / "ct" / "a.dcm",
                                                                                  tmp_path / "mr" / "b.dcm")]
    assert torch.equal(read_all(data), torch.stack(expected))
    assert data.sensitive_values  # the header pass still ran at load


def test_dicom_series_reads_each_volume_per_case(host, tmp_path):
    ct_series(tmp_path / "normal", [10.0, 0.0, 5.0])
    data = load(host, "dicom-series", tmp_path, path=str(tmp_path))
    assert_lazy(data)
    files = [tmp_path / "normal" / f"slice{i}.dcm" for i in (1, 2, 0)]  # sorted by z
    hu = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float64) - 1024 for f in files])
    expected = np.clip((hu - hu.min()) / (hu.max() - hu.min()), 0, 1).astype(np.float32)
    assert torch.equal(read_all(data), torch.from_numpy(expected)[None, None])
    os.utime(files[0], ns=(0, 0))  # touched after the load
    with pytest.raises(DataError, match="changed since the data set was loaded"):
        data.cases[0]
