"""The classification datasets image-csv, image-folder and medmnist: layout, values, labels,
pseudonyms, fingerprints, one clear error per kind of bad input; and the file names (and
NIfTI header texts) that image-mask-folder and nifti flag as sensitive."""

from __future__ import annotations

import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.core.errors import DataError
from medaudit.core.host import get_host
from medaudit.core.privacy import leaked_values, pseudonym

STEMS = ["smith-john-1961", "doe-jane-1970", "roe-rich-1983", "poe-edgar-1809"]


@pytest.fixture(scope="module")
def data_host():
    return get_host(load_entry_points=False)


def load(host, name, base, **params):
    cls = host.get("dataset", name)
    return cls(cls.Params.model_validate(params, context={"base_dir": base})).load()


def error(host, name, base, **params) -> str:
    with pytest.raises(DataError) as info:
        load(host, name, base, **params)
    return str(info.value)


def write_image(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)


def gray(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    """An h x w 8-bit image of ``value`` with a unique pixel (0, 0) = 255 - value."""
    image = np.full((h, w), value, dtype=np.uint8)
    image[0, 0] = 255 - value
    return image


def no_stem_parts(text: str) -> bool:
    return not any(part in text for stem in STEMS for part in stem.split("-"))


# -- image-csv ---------------------------------------------------------------------------


@pytest.fixture
def csv_set(tmp_path):
    """Four 8 x 8 images (pixel value 10 * (i + 1)) and a CSV with class-name labels."""
    labels = ["nodule", "normal", "nodule", "normal"]
    for i, stem in enumerate(STEMS):
        write_image(tmp_path / "img" / f"{stem}.png", gray(10 * (i + 1)))
    rows = ["file,age,label"] + [f"{stem}.png,{50 + i},{label}" for i, (stem, label) in enumerate(zip(STEMS, labels))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


def load_csv(host, base, **params):
    return load(host, "image-csv", base, **{"images": "img", "labels_csv": "labels.csv", **params})


def csv_error(host, base, **params) -> str:
    return error(host, "image-csv", base, **{"images": "img", "labels_csv": "labels.csv", **params})


def test_image_csv_values_labels_and_pseudonyms(data_host, csv_set):
    data = load_csv(data_host, csv_set)
    assert data.images.shape == (4, 1, 8, 8) and data.images.dtype == torch.float32
    # sorted by file name: doe (i=1, normal), poe (3, normal), roe (2, nodule), smith (0, nodule)
    assert data.class_names == ["nodule", "normal"]  # sorted distinct names
    assert data.labels.tolist() == [1, 1, 0, 0] and data.labels.dtype == torch.int64
    assert data.images[:, 0, 1, 1].tolist() == pytest.approx([20 / 255, 40 / 255, 30 / 255, 10 / 255])
    assert data.images[0, 0, 0, 0].item() == pytest.approx(235 / 255)
    assert load_csv(data_host, csv_set).case_ids == data.case_ids
    assert all(c.startswith("case-") and len(c) == 17 for c in data.case_ids) and len(set(data.case_ids)) == 4
    assert data.case_ids != [pseudonym(data.fingerprint, f"{s}.png") for s in sorted(STEMS)]
    assert "4 images in 2 classes (nodule: 2, normal: 2)" in data.description
    assert "1 x 8 x 8 (grayscale)" in data.description and "stored H x W 8 x 8 (4)" in data.description
    assert no_stem_parts(" ".join(data.case_ids) + data.description)
    for stem in STEMS:
        assert {stem, f"{stem}.png"} <= data.sensitive_values.keys()
    assert not {"nodule", "normal"} & data.sensitive_values.keys()
    # the run's guard would refuse an output naming a file
    assert leaked_values(f"worst case: {STEMS[0]}", data.sensitive_values)
    assert not leaked_values(data.description, data.sensitive_values)


def test_image_csv_classes_param_indices_rgb_resize_and_fingerprint(data_host, csv_set):
    rows = ["file,label"] + [f"{stem}.png,{i % 3}" for i, stem in enumerate(STEMS)]
    (csv_set / "idx.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_csv(data_host, csv_set, labels_csv="idx.csv")
    assert data.class_names == ["class0", "class1", "class2"]
    assert data.labels.tolist() == [1, 0, 2, 0]  # doe 1, poe 3 % 3, roe 2, smith 0
    named = load_csv(data_host, csv_set, labels_csv="idx.csv", classes=["a", "b", "c", "d"], grayscale=False, size=4)
    assert named.class_names == ["a", "b", "c", "d"] and named.labels.tolist() == [1, 0, 2, 0]
    assert named.images.shape == (4, 3, 4, 4)
    assert torch.equal(named.images[:, 0], named.images[:, 2])  # grey image as RGB
    assert "resized to 4 x 4" in named.description
    # names and indices mix when classes are given
    (csv_set / "mixed.csv").write_text("file,label\n" + "".join(f"{s}.png,{'b' if i else 0}\n" for i, s in enumerate(STEMS)))
    assert load_csv(data_host, csv_set, labels_csv="mixed.csv", classes=["a", "b"]).labels.tolist() == [1, 1, 1, 0]

    first = load_csv(data_host, csv_set)
    assert load_csv(data_host, csv_set).fingerprint == first.fingerprint
    moved = csv_set / "moved"
    shutil.copytree(csv_set / "img", moved / "img")
    shutil.copy(csv_set / "labels.csv", moved / "labels.csv")
    assert load_csv(data_host, moved).fingerprint == first.fingerprint
    assert load_csv(data_host, csv_set, size=8).fingerprint != first.fingerprint
    (moved / "labels.csv").write_text((moved / "labels.csv").read_text().replace("nodule", "lesion"))
    assert load_csv(data_host, moved).fingerprint != first.fingerprint


def test_image_csv_16_bit_float_subfolders_max_cases_and_unlisted(data_host, tmp_path):
    wide = np.full((4, 4), 1000, dtype=np.uint16)
    wide[0, 0] = 65535
    write_image(tmp_path / "img" / "a.png", wide)
    write_image(tmp_path / "img" / "batch-2" / "b.tif", np.full((4, 4), 0.25, dtype=np.float32), mode="F")
    write_image(tmp_path / "img" / "c.bmp", gray(5, 4, 4))
    (tmp_path / "labels.csv").write_text("name;dx\na.png;x\nbatch-2/b.tif;y\n", encoding="utf-8")
    params = {"file_column": "name", "label_column": "dx", "delimiter": ";"}
    assert "1 image in" in csv_error(data_host, tmp_path, **params) and "c.bmp" in csv_error(data_host, tmp_path, **params)
    data = load_csv(data_host, tmp_path, ignore_unlisted=True, **params)
    assert data.images.shape == (2, 1, 4, 4) and data.class_names == ["x", "y"]
    assert data.images[0, 0, 0, 0].item() == 1.0 and data.images[0, 0, 1, 1].item() == pytest.approx(1000 / 65535)
    assert torch.all(data.images[1] == 0.25)
    assert "1 images without a row in the CSV ignored" in data.description
    assert {"batch-2/b.tif", "batch-2", "b.tif", "c.bmp"} <= data.sensitive_values.keys()
    one = load_csv(data_host, tmp_path, ignore_unlisted=True, max_cases=1, **params)
    assert one.images.shape == (1, 1, 4, 4) and one.class_names == ["x", "y"]
    assert "first 1 of 2 listed images" in one.description


@pytest.mark.parametrize(
    "csv_text, params, expected",
    [
        (None, {"labels_csv": "nowhere.csv"}, "labels_csv not found"),
        ("", {}, "labels.csv is empty"),
        ("file,label\n", {}, "has no rows below its header; the data set is empty"),
        ("path,label\nx.png,a\n", {}, "has no column 'file' \\(columns: 'path', 'label'\\); set file_column"),
        ("file,label\nx.png,a\n", {"label_column": "dx"}, "has no column 'dx'"),
        ("file,label\nmissing.png,a\n", {}, "line 2 names missing.png, which is not in"),
        ("file,label\nx.png,a\ny.png,a\nx.png,b\n", {}, "lists file x.png twice \\(lines 2 and 4\\)"),
        ("file,label\nx.png,a\ny.png,c\n", {"classes": ["a", "b"]}, "line 3 has label 'c', which is neither one of"),
        ("file,label\nx.png,0\ny.png,2\n", {"classes": ["a", "b"]}, "label '2', which is neither one of classes \\(a, b\\) nor an index 0 to 1"),
        ("file,label\nx.png,1\ny.png,-1\n", {}, "line 3 has negative label -1"),
        ("file,label\nx.png,\ny.png,a\n", {}, "line 2 has no label"),
        ("file,label\n../x.png,a\n", {}, "must be a path relative to the images folder"),
        ("file,label\nx.png\n", {}, "line 2 has 1 fields but the header has 2"),
        ("file,label\nx.png,a\n", {}, "1 image in .* has no row in labels.csv \\(first: y.png\\)"),
        (b"file,label\nx.png,\xff\n", {}, "cannot read labels_csv labels.csv: UnicodeDecodeError"),
    ],
)
def test_image_csv_errors(data_host, tmp_path, csv_text, params, expected):
    write_image(tmp_path / "img" / "x.png", gray(1))
    write_image(tmp_path / "img" / "y.png", gray(2))
    if csv_text is not None:
        path = tmp_path / "labels.csv"
        path.write_bytes(csv_text) if isinstance(csv_text, bytes) else path.write_text(csv_text, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        load_csv(data_host, tmp_path, **params)


def test_image_csv_bad_images(data_host, tmp_path):
    (tmp_path / "labels.csv").write_text("file,label\nx.png,a\ny.png,a\n", encoding="utf-8")
    assert "images folder not found" in csv_error(data_host, tmp_path)
    write_image(tmp_path / "img" / "x.png", gray(1))
    write_image(tmp_path / "img" / "y.png", gray(1, 6, 8))
    with pytest.raises(DataError, match="image y.png is 6 x 8 but image x.png is 8 x 8; set size"):
        load_csv(data_host, tmp_path)
    good = (tmp_path / "img" / "y.png").read_bytes()
    (tmp_path / "img" / "y.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(DataError, match="cannot read image y.png"):
        load_csv(data_host, tmp_path)
    (tmp_path / "img" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image y.png"):
        load_csv(data_host, tmp_path)
    (tmp_path / "img" / "y.png").unlink()
    bad = np.zeros((8, 8), dtype=np.float32)
    bad[3, 3] = np.nan
    write_image(tmp_path / "img" / "y.tif", bad, mode="F")
    (tmp_path / "labels.csv").write_text("file,label\nx.png,a\ny.tif,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="image y.tif contains NaN or Inf values"):
        load_csv(data_host, tmp_path)
    write_image(tmp_path / "img" / "y.tif", np.full((8, 8), 2.0, dtype=np.float32), mode="F")
    with pytest.raises(DataError, match="float image y.tif has values outside \\[0, 1\\]"):
        load_csv(data_host, tmp_path)


# -- image-folder ------------------------------------------------------------------------


@pytest.fixture
def class_tree(tmp_path):
    """normal/ holds 3 images, nodule/ 1; pixel (1, 1) = 10 * (index of the stem) + 10."""
    for i, stem in enumerate(STEMS):
        write_image(tmp_path / "root" / ("normal" if i < 3 else "nodule") / f"{stem}.png", gray(10 * (i + 1)))
    (tmp_path / "root" / "normal" / "notes.txt").write_text("not an image")
    (tmp_path / "root" / "normal" / "deeper").mkdir()
    return tmp_path


def load_tree(host, base, **params):
    return load(host, "image-folder", base, **{"path": "root", **params})


def test_image_folder_layout_labels_and_privacy(data_host, class_tree):
    data = load_tree(data_host, class_tree)
    assert data.class_names == ["nodule", "normal"] and data.images.shape == (4, 1, 8, 8)
    assert data.labels.tolist() == [0, 1, 1, 1]
    # nodule: poe (40); normal sorted: doe (20), roe (30), smith (10)
    assert data.images[:, 0, 1, 1].tolist() == pytest.approx([40 / 255, 20 / 255, 30 / 255, 10 / 255])
    assert "4 images in 2 classes (nodule: 1, normal: 3)" in data.description
    assert "1 non-image files ignored" in data.description
    assert no_stem_parts(" ".join(data.case_ids) + data.description)
    assert all(f"{s}.png" in data.sensitive_values for s in STEMS)
    assert len(set(data.case_ids)) == 4

    ordered = load_tree(data_host, class_tree, classes=["normal", "nodule"], max_cases=2, grayscale=False)
    assert ordered.class_names == ["normal", "nodule"] and ordered.labels.tolist() == [0, 1]  # one of each class
    assert ordered.images.shape == (2, 3, 8, 8) and "2 of 4 images (max_cases)" in ordered.description
    assert load_tree(data_host, class_tree).fingerprint == data.fingerprint
    assert ordered.fingerprint != data.fingerprint


def test_image_folder_class_name_equal_to_a_file_stem_is_not_secret(data_host, tmp_path):
    write_image(tmp_path / "root" / "benign" / "benign.png", gray(1))
    write_image(tmp_path / "root" / "malignant" / "case-0007.png", gray(2))
    data = load_tree(data_host, tmp_path)
    # the stem is part of a class name the report shows anyway; the file name stays guarded
    assert "benign" not in data.sensitive_values and "benign.png" in data.sensitive_values
    assert not leaked_values("class benign: 1 case", data.sensitive_values)
    assert {"case-0007", "case-0007.png"} <= data.sensitive_values.keys()


def test_image_folder_errors(data_host, class_tree):
    assert "root folder not found" in error(data_host, "image-folder", class_tree, path="nowhere")
    (class_tree / "flat").mkdir()
    assert "no class subfolders in" in error(data_host, "image-folder", class_tree, path="flat")
    assert "class folder 'tumour' not found" in load_error_tree(data_host, class_tree, classes=["normal", "tumour"])
    (class_tree / "root" / "empty").mkdir()
    assert "class folder 'empty' holds no images" in load_error_tree(data_host, class_tree)
    assert load_tree(data_host, class_tree, classes=["normal", "nodule"]).images.shape[0] == 4
    (class_tree / "root" / "empty").rmdir()
    (class_tree / "root" / "nodule" / f"{STEMS[3]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert f"cannot read image nodule/{STEMS[3]}.png" in load_error_tree(data_host, class_tree)


def load_error_tree(host, base, **params) -> str:
    return error(host, "image-folder", base, **{"path": "root", **params})


# -- medmnist ----------------------------------------------------------------------------


def medmnist_arrays(shape=(28, 28), n=(6, 2, 4), classes=3, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "val", "test"), n):
        out[f"{split}_images"] = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    return out


def write_npz(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_gray_rgb_and_3d(data_host, tmp_path):
    arrays = medmnist_arrays()
    arrays["train_labels"][0, 0] = 4  # the largest label of the file fixes the number of classes
    write_npz(tmp_path / "gray.npz", arrays)
    data = load(data_host, "medmnist", tmp_path, path="gray.npz")
    assert data.images.shape == (4, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 1, 2, 0] and data.labels.dtype == torch.int64
    assert data.class_names == ["class0", "class1", "class2", "class3", "class4"]
    np.testing.assert_allclose(data.images[:, 0].numpy(), arrays["test_images"] / 255.0, atol=1e-7)
    assert all(c.startswith("case-") for c in data.case_ids) and len(set(data.case_ids)) == 4
    assert "4 test images in 5 classes" in data.description and "split sizes train 6, val 2, test 4" in data.description
    assert "1 x 28 x 28 (greyscale 2D, C x H x W)" in data.description
    assert data.sensitive_values == {}

    train = load(data_host, "medmnist", tmp_path, path="gray.npz", split="train", max_cases=3,
                 classes=["a", "b", "c", "d", "e"])
    assert train.images.shape == (3, 1, 28, 28) and train.labels.tolist() == [4, 1, 2]
    assert train.class_names == ["a", "b", "c", "d", "e"] and "(first 3 of 6)" in train.description
    assert train.fingerprint != data.fingerprint and set(train.case_ids).isdisjoint(data.case_ids)
    assert load(data_host, "medmnist", tmp_path, path="gray.npz").fingerprint == data.fingerprint

    rgb = medmnist_arrays(shape=(8, 8, 3))
    write_npz(tmp_path / "rgb.npz", rgb)
    data = load(data_host, "medmnist", tmp_path, path="rgb.npz")
    assert data.images.shape == (4, 3, 8, 8)
    assert data.images[2, 1, 3, 4].item() == pytest.approx(rgb["test_images"][2, 3, 4, 1] / 255)

    vol = medmnist_arrays(shape=(6, 8, 8))
    write_npz(tmp_path / "vol.npz", vol)
    data = load(data_host, "medmnist", tmp_path, path="vol.npz", split="val")
    assert data.images.shape == (2, 1, 6, 8, 8) and "(3D, C x D x H x W)" in data.description
    assert data.images[1, 0, 5, 7, 2].item() == pytest.approx(vol["val_images"][1, 5, 7, 2] / 255)


def test_medmnist_float_images(data_host, tmp_path):
    arrays = medmnist_arrays(shape=(4, 4))
    arrays["test_images"] = np.full((4, 4, 4), 0.5, dtype=np.float32)
    write_npz(tmp_path / "f.npz", arrays)
    assert torch.all(load(data_host, "medmnist", tmp_path, path="f.npz").images == 0.5)
    arrays["test_images"][1, 2, 3] = np.nan
    write_npz(tmp_path / "f.npz", arrays)
    with pytest.raises(DataError, match="test_images of f.npz contains NaN or Inf values"):
        load(data_host, "medmnist", tmp_path, path="f.npz")
    arrays["test_images"][1, 2, 3] = 3.0
    write_npz(tmp_path / "f.npz", arrays)
    with pytest.raises(DataError, match="float values outside \\[0, 1\\]"):
        load(data_host, "medmnist", tmp_path, path="f.npz")


def _corrupt_member(path):
    """Flip bytes in the middle of the compressed test_images member."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("test_images.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 20, start + info.compress_size - 5):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("missing", "file not found: .* never downloads"),
        ("text", "cannot read m.npz: not a NumPy .npz archive, or a corrupt one"),
        ("truncated", "cannot read m.npz: not a NumPy .npz archive, or a corrupt one"),
        ("member", "cannot read array test_images of m.npz"),
        ("npy", "m.npz holds a single array \\(.npy\\), not a MedMNIST .npz archive"),
        ("pickle", "cannot read array test_labels of m.npz: ValueError"),
        ("keys", "m.npz has no test_images or test_labels \\(keys: train_images, train_labels\\)"),
        ("multilabel", "test_labels of m.npz is 4 x 14: multi-label data .* unsupported"),
        ("mismatch", "m.npz has 4 test images but 3 test labels"),
        ("shape", "test_images of m.npz has shape \\(4, 2, 2, 2, 2\\)"),
        ("dtype", "test_images of m.npz has data type int32"),
        ("empty", "the test split of m.npz is empty"),
        ("classes", "m.npz holds label 2 but classes lists only 2 names"),
        ("negative", "test_labels of m.npz holds negative label -1"),
    ],
)
def test_medmnist_errors(data_host, tmp_path, damage, expected):
    arrays = medmnist_arrays(shape=(4, 4))
    path = tmp_path / "m.npz"
    params = {}
    if damage == "text":
        path.write_text("not an archive " * 10)
    elif damage == "truncated":
        data = write_npz(path, arrays).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "member":
        write_npz(path, arrays)
        _corrupt_member(path)
    elif damage == "npy":
        with open(path, "wb") as f:
            np.save(f, arrays["test_images"])
    elif damage == "pickle":
        arrays["test_labels"] = np.array([[0], [1], ["x"], [None]], dtype=object)
        np.savez(path, **arrays)
    elif damage == "keys":
        write_npz(path, {k: v for k, v in arrays.items() if k.startswith("train")})
    elif damage == "multilabel":
        arrays["test_labels"] = np.zeros((4, 14), dtype=np.uint8)
        write_npz(path, arrays)
    elif damage == "mismatch":
        arrays["test_labels"] = arrays["test_labels"][:3]
        write_npz(path, arrays)
    elif damage == "shape":
        arrays["test_images"] = np.zeros((4, 2, 2, 2, 2), dtype=np.uint8)
        write_npz(path, arrays)
    elif damage == "dtype":
        arrays["test_images"] = arrays["test_images"].astype(np.int32)
        write_npz(path, arrays)
    elif damage == "empty":
        arrays["test_images"], arrays["test_labels"] = arrays["test_images"][:0], arrays["test_labels"][:0]
        write_npz(path, arrays)
    elif damage == "classes":
        write_npz(path, arrays)
        params["classes"] = ["a", "b"]
    elif damage == "negative":
        arrays["test_labels"] = arrays["test_labels"].astype(np.int64) - 1
        write_npz(path, arrays)
    with pytest.raises(DataError, match=expected):
        load(data_host, "medmnist", tmp_path, path="m.npz", **params)


# -- sensitive file names in image-mask-folder and nifti -----------------------------------


def test_image_mask_folder_flags_file_names(data_host, tmp_path):
    for stem in STEMS[:2]:
        write_image(tmp_path / "img" / f"{stem}.jpg", gray(3))
        write_image(tmp_path / "msk" / f"{stem}.png", np.zeros((8, 8), dtype=np.uint8))
    write_image(tmp_path / "img" / "lesion.png", gray(3))
    write_image(tmp_path / "msk" / "lesion.png", np.ones((8, 8), dtype=np.uint8))
    data = load(data_host, "image-mask-folder", tmp_path, images="img", masks="msk",
                class_names=["background", "lesion"])
    for stem in STEMS[:2]:
        assert {stem, f"{stem}.jpg", f"{stem}.png"} <= data.sensitive_values.keys()
    assert "lesion" not in data.sensitive_values and "lesion.png" in data.sensitive_values  # stem = a class name
    assert not leaked_values(data.description + " ".join(data.case_ids), data.sensitive_values)


def test_nifti_flags_file_names_and_header_texts(data_host, tmp_path):
    vol = np.zeros((4, 5, 3), dtype=np.float32)
    vol[1, 2, 0] = 10.0
    for folder, array in (("vol", vol), ("lab", (vol > 0).astype(np.uint8))):
        img = nib.Nifti1Image(array, np.eye(4))
        if folder == "vol":
            img.header["descrip"] = b"Smith^John 1961-04-01"
            img.header["aux_file"] = b"MRN4471"
            img.header["db_name"] = b"  "  # blank: nothing to guard
        (tmp_path / folder).mkdir()
        nib.save(img, str(tmp_path / folder / f"{STEMS[0]}.nii.gz"))
    data = load(data_host, "nifti", tmp_path, images="vol", labels="lab")
    assert data.images.shape == (1, 1, 3, 5, 4) and data.images[0, 0, 0, 2, 1].item() == 1.0
    assert {"Smith^John 1961-04-01", "MRN4471", STEMS[0], f"{STEMS[0]}.nii.gz"} <= data.sensitive_values.keys()
    assert not any(not v.strip() for v in data.sensitive_values)
    assert not leaked_values(data.description + " ".join(data.case_ids), data.sensitive_values)


def test_image_csv_keeps_named_columns_as_covariates_in_case_order(data_host, csv_set):
    data = load_csv(data_host, csv_set, covariate_columns=["age"])
    ages = {f"{stem}.png": str(50 + i) for i, stem in enumerate(STEMS)}
    assert data.covariates == [{"age": ages[name]} for name in sorted(ages)]
    assert load_csv(data_host, csv_set).covariates is None
    assert "no column 'site'" in csv_error(data_host, csv_set, covariate_columns=["site"])
