"""The segmentation datasets image-mask-folder (2D) and nifti (3D): layout, values,
pseudonyms, fingerprints, and one clear error per kind of bad input."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.core.errors import DataError
from medaudit.core.host import get_host
from medaudit.core.privacy import pseudonym

STEMS = ["smith-john-1961", "doe-jane-1970", "roe-rich-1983"]


@pytest.fixture(scope="module")
def seg_host():
    return get_host(load_entry_points=False)


def load(host, name, base, **params):
    cls = host.get("dataset", name)
    return cls(cls.Params.model_validate(params, context={"base_dir": base})).load()


# -- 2D: image-mask-folder ---------------------------------------------------------------


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)


@pytest.fixture
def folders(tmp_path):
    """Three 6x8 grayscale images with 3-class masks; pixel (0, 0) of case i is 51 * i."""
    for i, stem in enumerate(STEMS):
        image = np.full((6, 8), 100, dtype=np.uint8)
        image[0, 0] = 51 * i
        mask = np.zeros((6, 8), dtype=np.uint8)
        mask[2:4, 2:4] = 1
        mask[5, 7] = 2
        write_png(tmp_path / "img" / f"{stem}.png", image)
        write_png(tmp_path / "msk" / f"{stem}.png", mask)
    return tmp_path


def load2d(host, base, **params):
    return load(host, "image-mask-folder", base, **{"images": "img", "masks": "msk", **params})


def test_pseudonym_key_from_the_environment(seg_host, folders, monkeypatch):
    monkeypatch.setenv("MEDAUDIT_PSEUDONYM_KEY", "site secret")
    data = load2d(seg_host, folders)
    assert data.case_ids == [pseudonym("site secret", f"{s}.png") for s in sorted(STEMS)]


def test_folder_layout_values_and_pseudonyms(seg_host, folders):
    data = load2d(seg_host, folders)
    assert data.images.shape == (3, 1, 6, 8) and data.images.dtype == torch.float32
    assert data.masks.shape == (3, 6, 8) and data.masks.dtype == torch.int64
    assert data.labels.tolist() == [0, 0, 0] and data.labels.dtype == torch.int64
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    # sorted by file name: doe (i=1), roe (i=2), smith (i=0)
    assert data.images[:, 0, 0, 0].tolist() == pytest.approx([0.2, 0.4, 0.0])
    assert data.images[0, 0, 1, 1].item() == pytest.approx(100 / 255)
    assert data.masks[0, 2, 2] == 1 and data.masks[0, 5, 7] == 2 and data.masks[0, 0, 0] == 0
    assert data.class_names == ["image"]
    assert data.mask_class_names == ["class0", "class1", "class2"]
    assert data.spacing is None
    # Not derivable from the published fingerprint: guessing file names needs the images.
    assert set(data.case_ids).isdisjoint(pseudonym(data.fingerprint, f"{s}.png") for s in STEMS)
    assert len(set(data.case_ids)) == 3 and load2d(seg_host, folders).case_ids == data.case_ids
    for text in data.case_ids + [data.description]:
        assert not any(part in text for stem in STEMS for part in stem.split("-"))
    assert all(c.startswith("case-") and len(c) == 17 for c in data.case_ids)
    assert "3 cases" in data.description and "1 x 6 x 8" in data.description


def test_folder_fingerprint_is_deterministic_and_location_free(seg_host, folders, tmp_path_factory):
    first = load2d(seg_host, folders)
    assert load2d(seg_host, folders).fingerprint == first.fingerprint
    moved = tmp_path_factory.mktemp("moved")
    shutil.copytree(folders / "img", moved / "img")
    shutil.copytree(folders / "msk", moved / "msk")
    assert load2d(seg_host, moved).fingerprint == first.fingerprint
    assert load2d(seg_host, moved, class_names=["a", "b", "c"]).fingerprint != first.fingerprint
    write_png(moved / "msk" / f"{STEMS[0]}.png", np.ones((6, 8), dtype=np.uint8))
    changed = load2d(seg_host, moved)
    assert changed.fingerprint != first.fingerprint and changed.case_ids != first.case_ids


def test_folder_rgb_resize_and_max_cases(seg_host, tmp_path):
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    mask = np.zeros((6, 10), dtype=np.uint8)
    mask[:, 5:] = 1
    for stem in ("a", "b"):
        write_png(tmp_path / "img" / f"{stem}.png", rgb)
        write_png(tmp_path / "msk" / f"{stem}.png", mask)
    data = load2d(seg_host, tmp_path, grayscale=False, size=4, max_cases=1)
    assert data.images.shape == (1, 3, 4, 4) and data.masks.shape == (1, 4, 4)
    assert torch.allclose(data.images[0, 0], torch.ones(4, 4))
    assert data.images[0, 1:].abs().max() == 0
    assert set(data.masks.unique().tolist()) == {0, 1}  # nearest: no invented labels
    assert data.masks[0, :, 0].tolist() == [0] * 4 and data.masks[0, :, 3].tolist() == [1] * 4


def test_folder_maps_0_255_masks(seg_host, tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 1] = 255
    write_png(tmp_path / "img" / "x.tif", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "msk" / "x.png", mask)
    data = load2d(seg_host, tmp_path, mask_values=[0, 255], class_names=["background", "lesion"])
    assert data.masks[0].tolist() == (mask // 255).astype(int).tolist()
    assert data.mask_class_names == ["background", "lesion"]


def folder_error(host, base, **params) -> str:
    with pytest.raises(DataError) as info:
        load2d(host, base, **params)
    return str(info.value)


def test_folder_errors_name_the_file(seg_host, folders):
    assert "images folder not found" in folder_error(seg_host, folders, images="nowhere")
    (folders / "empty").mkdir()
    assert "no images" in folder_error(seg_host, folders, images="empty")

    write_png(folders / "img" / "orphan.png", np.zeros((6, 8), dtype=np.uint8))
    assert "orphan.png has no mask" in folder_error(seg_host, folders)
    (folders / "img" / "orphan.png").unlink()

    write_png(folders / "img" / "odd.png", np.zeros((5, 8), dtype=np.uint8))
    write_png(folders / "msk" / "odd.png", np.zeros((5, 8), dtype=np.uint8))
    message = folder_error(seg_host, folders)
    assert "odd.png" in message and "set size" in message
    assert load2d(seg_host, folders, size=6).images.shape == (4, 1, 6, 6)
    write_png(folders / "msk" / "odd.png", np.zeros((6, 8), dtype=np.uint8))
    assert "mask odd.png is 6x8 but its image is 5x8" in folder_error(seg_host, folders)
    (folders / "msk" / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "cannot read mask odd.png" in folder_error(seg_host, folders)
    (folders / "msk" / "odd.png").unlink()
    write_png(folders / "msk" / "odd.jpg", np.zeros((5, 8), dtype=np.uint8))
    assert "mask odd.jpg is a JPEG" in folder_error(seg_host, folders)


@pytest.mark.parametrize(
    "values, mode, expected",
    [
        (np.array([[0, -1]], dtype=np.int32), "I", "mask m.tif has negative value -1"),
        (np.array([[0, 1.5]], dtype=np.float32), "F", "mask m.tif has non-integer value 1.5"),
        (np.array([[0, 7]], dtype=np.uint8), "L", "mask m.tif has value 7 not in mask_values"),
    ],
)
def test_folder_rejects_bad_mask_values(seg_host, tmp_path, values, mode, expected):
    write_png(tmp_path / "img" / "m.png", np.zeros((1, 2), dtype=np.uint8))
    write_png(tmp_path / "msk" / "m.tif", values, mode=mode)
    assert expected in folder_error(seg_host, tmp_path, mask_values=[0, 255])


# -- 3D: nifti ---------------------------------------------------------------------------


def write_nii(path, array, zooms=(1.0, 1.0, 1.0), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.diag([*zooms[:3], 1.0]) if affine is None else affine)
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def volume(x=8, y=10, z=6):
    """An (X, Y, Z) volume of 50s with a unique 200 at x=1, y=2, z=3."""
    vol = np.full((x, y, z), 50.0, dtype=np.float32)
    vol[1, 2, 3] = 200.0
    return vol


def labelmap(x=8, y=10, z=6):
    lab = np.zeros((x, y, z), dtype=np.uint8)
    lab[1, 2, 3] = 2
    lab[4, 5, 0] = 1
    return lab


def load3d(host, base, **params):
    return load(host, "nifti", base, **{"images": "vol", "labels": "lab", **params})


def test_nifti_axis_order_window_spacing(seg_host, tmp_path):
    vol = volume()
    vol[0, 0, 0] = -10.0
    vol[7, 9, 5] = 25.0
    write_nii(tmp_path / "vol" / "smith-john.nii.gz", vol, zooms=(0.5, 0.7, 2.0))
    write_nii(tmp_path / "lab" / "smith-john.nii", labelmap(), zooms=(0.5, 0.7, 2.0))
    data = load3d(seg_host, tmp_path, intensity_range=[0, 100])
    assert data.images.shape == (1, 1, 6, 10, 8) and data.images.dtype == torch.float32
    assert data.masks.shape == (1, 6, 10, 8) and data.masks.dtype == torch.int64
    # (X, Y, Z) -> (D, H, W) = (Z, Y, X)
    assert data.images[0, 0, 3, 2, 1].item() == 1.0  # 200 clipped
    assert data.images[0, 0, 0, 0, 0].item() == 0.0  # -10 clipped
    assert data.images[0, 0, 5, 9, 7].item() == 0.25
    assert data.images[0, 0, 1, 1, 1].item() == 0.5
    assert data.masks[0, 3, 2, 1] == 2 and data.masks[0, 0, 5, 4] == 1 and int(data.masks.sum()) == 3
    assert data.spacing == (2.0, 0.7, 0.5)
    assert "spacing 2 x 0.7 x 0.5 mm" in data.description and "orientation RAS (1)" in data.description
    assert data.class_names == ["image"] and data.mask_class_names == ["class0", "class1", "class2"]
    assert data.labels.tolist() == [0]
    assert data.case_ids != [pseudonym(data.fingerprint, "smith-john.nii.gz")]
    assert not any(s in data.case_ids[0] + data.description for s in ("smith", "john"))
    assert load3d(seg_host, tmp_path, intensity_range=[0, 100]).fingerprint == data.fingerprint
    assert load3d(seg_host, tmp_path, intensity_range=[0, 200]).fingerprint != data.fingerprint


def test_nifti_default_window_crop_pad_and_mixed_spacing(seg_host, tmp_path):
    for name, zooms in (("a", (1.0, 1.0, 1.0)), ("b", (1.0, 1.0, 3.0))):
        write_nii(tmp_path / "vol" / f"{name}.nii", volume(), zooms=zooms)
        write_nii(tmp_path / "lab" / f"{name}.nii.gz", labelmap(), zooms=zooms)
    data = load3d(seg_host, tmp_path, shape=[4, 12, 8], class_names=["bg", "organ", "tumour"])
    assert data.images.shape == (2, 1, 4, 12, 8) and data.masks.shape == (2, 4, 12, 8)
    # default window: the volume's own min (50) and max (200)
    assert data.images[0, 0, 2, 3, 1].item() == 1.0  # D cropped by 1, H padded by 1
    assert data.images[0, 0, 0, 1, 0].item() == 0.0 and data.images[0, 0, 0, 0, 0].item() == 0.0  # padding
    assert data.masks[0, 2, 3, 1] == 2 and data.masks[:, :, 0].sum() == 0
    assert data.spacing is None and data.case_spacings == [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0)]
    assert "spacing differs between cases" in data.description
    assert data.mask_class_names == ["bg", "organ", "tumour"]
    assert len(set(data.case_ids)) == 2


def nifti_error(host, base, **params) -> str:
    with pytest.raises(DataError) as info:
        load3d(host, base, **params)
    return str(info.value)


def test_nifti_errors_name_the_file(seg_host, tmp_path):
    assert "images folder not found" in nifti_error(seg_host, tmp_path)
    (tmp_path / "vol").mkdir()
    (tmp_path / "lab").mkdir()
    assert "no volumes" in nifti_error(seg_host, tmp_path)
    write_nii(tmp_path / "vol" / "a.nii.gz", volume())
    write_nii(tmp_path / "lab" / "a.nii.gz", labelmap())
    write_nii(tmp_path / "vol" / "orphan.nii", volume())
    assert "volume orphan.nii has no label map" in nifti_error(seg_host, tmp_path)
    write_nii(tmp_path / "lab" / "orphan.nii", labelmap()[:, :, :5])
    assert "label map orphan.nii is 5 x 10 x 8 (D x H x W) but its volume is 6 x 10 x 8" in nifti_error(
        seg_host, tmp_path
    )
    write_nii(tmp_path / "vol" / "orphan.nii", volume(z=5))
    assert "volume orphan.nii is 5 x 10 x 8" in nifti_error(seg_host, tmp_path)
    write_nii(tmp_path / "lab" / "orphan.nii", -labelmap(z=5).astype(np.int16))
    assert "mask orphan.nii has negative value -2" in nifti_error(seg_host, tmp_path, shape=[6, 10, 8])
    write_nii(tmp_path / "lab" / "orphan.nii", labelmap(z=5) * np.float32(0.5))
    assert "mask orphan.nii has non-integer value 0.5" in nifti_error(seg_host, tmp_path, shape=[6, 10, 8])
    bad = volume(z=5)
    bad[0, 0, 0] = np.nan
    write_nii(tmp_path / "lab" / "orphan.nii", labelmap(z=5))
    write_nii(tmp_path / "vol" / "orphan.nii", bad)
    assert "volume orphan.nii contains NaN or Inf voxels" in nifti_error(seg_host, tmp_path)
    write_nii(tmp_path / "vol" / "orphan.nii", np.zeros((8, 10, 5, 2), dtype=np.float32), zooms=(1, 1, 1, 1))
    assert "volume orphan.nii has shape (8, 10, 5, 2) (X, Y, Z, ...)" in nifti_error(seg_host, tmp_path)
    (tmp_path / "vol" / "orphan.nii").write_bytes(b"not a nifti file at all" * 20)
    assert "cannot read volume orphan.nii" in nifti_error(seg_host, tmp_path)
    (tmp_path / "vol" / "orphan.nii").unlink()
    write_nii(tmp_path / "vol" / "a.nii", volume())
    assert "volumes a.nii and a.nii.gz have the same name" in nifti_error(seg_host, tmp_path)


def test_nifti_reads_nibabel_test_data(seg_host, tmp_path):
    import nibabel.testing

    source = os.path.join(nibabel.testing.data_path, "anatomical.nii")  # shipped in nibabel's wheel
    img = nib.load(source)
    (tmp_path / "vol").mkdir()
    shutil.copy(source, tmp_path / "vol" / "anat.nii")
    write_nii(tmp_path / "lab" / "anat.nii", np.zeros(img.shape, dtype=np.uint8), affine=img.affine,
              zooms=tuple(float(z) for z in img.header.get_zooms()))
    data = load3d(seg_host, tmp_path)
    x, y, z = img.shape
    assert data.images.shape == (1, 1, z, y, x)
    assert data.spacing == tuple(float(s) for s in reversed(img.header.get_zooms()))
    assert 0.0 <= data.images.min() and data.images.max() == 1.0
    assert f"orientation {''.join(nib.aff2axcodes(img.affine))} (1)" in data.description
