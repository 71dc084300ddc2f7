"""Data that streams: LoadedData.batches, the lazy phantom, and the one-pass summary
(intensity statistics, label checks, class counts) against the in-memory computations
they replace."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from medaudit.core.components import LoadedData, Task
from medaudit.core.data import check_data_fits, class_summary, summarise
from medaudit.core.errors import DataError
from medaudit.core.phantoms import BLOCK, PhantomCases, case_draws, make_phantoms
from medaudit.plugins.datasets.phantom import Phantom, PhantomParams


def in_memory(images, labels, masks=None, names=None):
    n = len(images)
    return LoadedData(images, labels, [f"c{i}" for i in range(n)], ["normal", "nodule"], "fp", masks=masks,
                      mask_class_names=names)


def old_intensity(images):
    """The in-memory statistics the summary replaces."""
    flat = images.transpose(0, 1).flatten(1).float()
    return {name: [round(v, 6) for v in values.tolist()] for name, values in (
        ("min", flat.amin(1)), ("max", flat.amax(1)), ("mean", flat.mean(1)), ("std", flat.std(1)),
    )}


class CountingCases(PhantomCases):
    def __init__(self, p):
        super().__init__(p)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def small():
    return make_phantoms(PhantomParams(n=50, size=32, seed=3))


def test_batches_of_tensors_equal_the_slices(small):
    images, labels, masks = small
    data = in_memory(images, labels, masks, ["a"] * 5)
    got = list(data.batches(7, 50, 16, task=Task.SEGMENTATION))
    assert [b for b, _, _ in got] == [7, 23, 39]
    for b, x, truth in got:
        assert torch.equal(x, images[b : min(b + 16, 50)]) and torch.equal(truth, masks[b : min(b + 16, 50)])
    got = list(in_memory(images, labels).batches(0, 50, 20))
    assert torch.equal(torch.cat([y for _, _, y in got]), labels)
    assert data.image_shape == (1, 32, 32)
    with pytest.raises(ValueError, match="pass task"):
        next(data.batches(0, 50, 16))


@pytest.mark.parametrize("kw", [dict(n=100, size=32), dict(n=BLOCK, size=16, seed=9, nodule_fraction=0.3),
                                dict(n=12, size=16, depth=6)])
def test_lazy_phantom_equals_make_phantoms_bit_for_bit(kw):
    p = PhantomParams(**kw)
    images, labels, masks = make_phantoms(p)
    data = Phantom(p).load()
    assert data.is_lazy and data.image_shape == tuple(images.shape[1:])
    assert torch.equal(data.labels, labels)
    got = list(data.batches(0, p.n, 32, task=Task.SEGMENTATION))
    assert torch.equal(torch.cat([x for _, x, _ in got]), images)
    assert torch.equal(torch.cat([m for _, _, m in got]), masks)
    assert torch.equal(data.images, images) and torch.equal(data.masks, masks)  # materialised on request


def test_lazy_phantom_past_one_block_is_consistent_and_streams():
    p = PhantomParams(n=BLOCK + 40, size=16, seed=2)
    data = Phantom(p).load()
    first = make_phantoms(p.model_copy(update={"n": BLOCK}))
    x = torch.cat([x for _, x, _ in data.batches(BLOCK - 8, p.n, 16, workers=2, task=Task.CLASSIFICATION)])
    assert torch.equal(x[:8], first[0][-8:]) and len(x) == 48
    assert not torch.equal(x[8:16], first[0][:8])  # block 1 has its own seed
    assert torch.equal(data.cases[BLOCK + 5]["label"], data.labels[BLOCK + 5])
    assert torch.equal(data.labels, case_draws(p.model_copy(update={"n": BLOCK}))[0].new_tensor(
        [int(data.cases[i]["label"]) for i in range(p.n)]))


def test_batches_never_materialise_a_lazy_set():
    p = PhantomParams(n=70, size=16)
    cases = CountingCases(p)
    data = LoadedData(None, case_draws(p)[0], [str(i) for i in range(70)], ["a", "b"], "fp",
                      mask_class_names=["m"] * 5, cases=cases, image_shape=(1, 16, 16))
    summary = summarise(data, Task.SEGMENTATION, 5, batch_size=32)
    assert cases.reads == 70 and data.__dict__.get("_images") is None and data.__dict__.get("_masks") is None
    assert summary.n == 70 and repr(data).startswith("LoadedData(70 cases")
    assert cases.reads == 70


def test_summary_numbers_equal_the_in_memory_ones(small):
    images, labels, masks = small
    data = in_memory(images, labels, masks, ["bg", "body", "lung", "bone", "nodule"])
    seg = summarise(data, Task.SEGMENTATION, 5, batch_size=8)
    assert seg.intensity == old_intensity(images)
    assert seg.mask_presence == torch.stack([(masks == c).flatten(1).any(1) for c in range(5)], 1).sum(0).tolist()
    assert class_summary(data, Task.SEGMENTATION, 5, seg)["class_counts"]["cases with nodule"] == seg.mask_presence[4]
    rgb = torch.cat([images, images.flip(2), images * 0.5], 1)
    cls = summarise(in_memory(rgb, labels), Task.CLASSIFICATION, 2, batch_size=7)
    assert cls.intensity == old_intensity(rgb)
    counts = class_summary(in_memory(rgb, labels), Task.CLASSIFICATION, 2, cls)["class_counts"]
    assert counts == {["normal", "nodule"][k]: v for k, v in sorted(Counter(labels.tolist()).items())}


def test_checks_keep_their_messages(small):
    images, labels, masks = small
    model = SimpleNamespace(in_channels=1, num_classes=2)
    bad = labels.clone()
    bad[11] = 2
    data = in_memory(images, bad)
    with pytest.raises(DataError, match="case c11: label 2 is outside the model's 2 classes"):
        check_data_fits(data, model, Task.CLASSIFICATION, summarise(data, Task.CLASSIFICATION, 2))
    seg = in_memory(images, labels, masks, ["m"] * 5)
    model4 = SimpleNamespace(in_channels=1, num_classes=4)
    first = next(i for i in range(50) if bool((masks[i] == 4).any()))
    with pytest.raises(DataError, match=f"case c{first}: label 4 is outside the model's 4 classes"):
        check_data_fits(seg, model4, Task.SEGMENTATION, summarise(seg, Task.SEGMENTATION, 4, batch_size=16))
    rgb = in_memory(images.expand(-1, 3, -1, -1), labels)
    with pytest.raises(DataError, match="images have 3 channels but the model takes 1"):
        check_data_fits(rgb, model, Task.CLASSIFICATION, summarise(rgb, Task.CLASSIFICATION, 2))
    with pytest.raises(DataError, match="segmentation needs masks"):
        summarise(data, Task.SEGMENTATION, 2)
    off = in_memory(images, labels, masks[:, :16], ["m"] * 5)
    with pytest.raises(DataError, match=r"masks of shape \(50, 16, 32\) do not match images of shape \(50, 1, 32, 32\)"):
        check_data_fits(off, SimpleNamespace(in_channels=1, num_classes=5), Task.SEGMENTATION,
                        summarise(off, Task.SEGMENTATION, 5))


def test_phantom_covariates_are_cheap_and_change_no_pixel():
    p = PhantomParams(n=40, size=16, covariates=True)
    data = Phantom(p).load()
    assert [c["nodule"] == "present" for c in data.covariates] == data.labels.bool().tolist()
    assert {c["nodule_size"] for c in data.covariates if c["nodule"] == "present"} <= {"small", "large"}
    plain = Phantom(PhantomParams(n=40, size=16)).load()
    assert plain.covariates is None and torch.equal(plain.images, data.images)
