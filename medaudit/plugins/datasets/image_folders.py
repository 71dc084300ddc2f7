"""Datasets: image-folder, image-mask-folder.

``image-folder`` reads 2D images in one subfolder per class; ``image-mask-folder`` reads
2D images and segmentation masks from two folders.

Most 2D segmentation sets are shipped as a folder of images and a folder of masks with
the same file stems, so that is what this reads, without a conversion step that could
silently change the data. Masks must be lossless (PNG, TIFF, BMP): JPEG compression
invents labels at every edge, so JPEG masks are refused rather than guessed at.

Case ids are pseudonyms (:func:`medaudit.core.privacy.pseudonym`, keyed with a secret
derived from the files' contents, never written out) because file names often carry
patient identifiers; neither the case ids nor the description contain file names, and the
names and stems of the files read go into :attr:`LoadedData.sensitive_values`, so the run
refuses to write an output that holds one (a name that is part of a class name is left
out: the report shows class names anyway; so are ordinary names, see
:func:`medaudit.core.privacy.ordinary`). Error messages do name the file (they go to the
user's own console only), so a bad file is easy to find and fix. Every file must lie inside
its folder once symbolic links are resolved (:func:`inside`).

The file helpers shared with the other file-based datasets are in :mod:`._files`.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import F, np, torch
from medaudit.core.privacy import drop_public, file_name_values, pseudonym, pseudonym_key
from medaudit.plugins.datasets._files import (
    IMAGE_SUFFIXES,
    ImageFileCases,
    LOSSY_SUFFIXES,
    MASK_SUFFIXES,
    ClassFolderParams,
    check_folder,
    class_folders,
    fingerprint_of,
    grayscale_field,
    image_array,
    index_by_key,
    list_files,
    mask_array,
    mask_class_names,
    match_by_key,
    open_image,
    read_bytes,
    read_checked,
    scan_images,
    resize_image,
    size_field,
    describe,
)


# -- image-mask-folder -------------------------------------------------------------------------


class ImageMaskFolderParams(Params):
    images: InputPath = Field(description="Folder of 2D images (png, tif, bmp, jpg); not searched recursively.")
    masks: InputPath = Field(
        description="Folder of masks with the same file stems as the images (lossless: png, tif, bmp)."
    )
    grayscale: bool = Field(True, description="Convert images to one channel; false gives three (RGB).")
    size: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="Resize to size x size (images bilinear, masks nearest); none: all images must share one shape.",
    )
    class_names: list[str] | None = Field(
        None, description="Names of the mask classes; default class0..classK-1 from the largest label."
    )
    mask_values: list[int] | None = Field(
        None,
        description="Pixel value of each class in the masks: the i-th value becomes class i (e.g. [0, 255] for "
        "binary masks saved as 0/255). Default: pixel values are the class indices.",
    )
    max_cases: int | None = Field(None, ge=1, description="Read only the first cases (sorted by file name).")

    @field_validator("mask_values")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("mask_values must list at least one value")
            if len(set(value)) != len(value):
                raise ValueError("mask_values must be distinct")
            if min(value) < 0:
                raise ValueError("mask_values must be >= 0")
        return value

    @model_validator(mode="after")
    def _names_match_values(self) -> "ImageMaskFolderParams":
        if self.class_names is not None and self.mask_values is not None and len(self.class_names) != len(self.mask_values):
            raise ValueError(
                f"class_names has {len(self.class_names)} names but mask_values has {len(self.mask_values)} values"
            )
        return self


def decode_pair(
    image_bytes: bytes, mask_bytes: bytes, image_name: str, mask_name: str, p: ImageMaskFolderParams, dataset: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One case of image-mask-folder from its files' bytes: the image (``C x H x W`` float32 in
    [0, 1]) and its mask (``H x W`` int64 class indices), checked, mapped and resized. The load
    pass and the lazy cases both call it, so a case read later is what the load checked."""
    image = image_array(open_image(image_bytes, image_name, "image", dataset), image_name, p.grayscale, dataset)
    mask = mask_array(open_image(mask_bytes, mask_name, "mask", dataset), mask_name, dataset)
    if mask.shape != image.shape[1:]:
        raise DataError(
            f"{dataset}: mask {mask_name} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{image.shape[1]}x{image.shape[2]}"
        )
    if p.mask_values is not None:
        mask = _map_values(mask, p.mask_values, mask_name, dataset)
    x, m = torch.from_numpy(image), torch.from_numpy(mask)
    if p.size is not None and tuple(m.shape) != (p.size, p.size):
        x = resize_image(x, p.size)
        m = F.interpolate(m[None, None].double(), size=(p.size, p.size), mode="nearest-exact")[0, 0].round().long()
    return x.clamp(0.0, 1.0).contiguous(), m.contiguous()


def _map_values(mask: np.ndarray, values: list[int], rel: str, dataset: str) -> np.ndarray:
    lookup = np.asarray(values, dtype=np.int64)
    order = np.argsort(lookup)
    pos = np.clip(np.searchsorted(lookup[order], mask), 0, len(values) - 1)
    found = lookup[order][pos] == mask
    if not found.all():
        bad = sorted(set(np.unique(mask[~found]).tolist()))
        raise DataError(
            f"{dataset}: mask {rel} has value {bad[0]} not in mask_values {values}"
            + (f" ({len(bad)} such values)" if len(bad) > 1 else "")
        )
    return order[pos].astype(np.int64)


class ImageMaskCases:
    """The cases of image-mask-folder, read one image and mask file per case (see
    :class:`~._files.ImageFileCases`): paths, hashes and params only, so it pickles."""

    def __init__(self, p: ImageMaskFolderParams, pairs: list[tuple[str, str]], hashes: list[str], dataset: str):
        self.p, self.pairs, self.hashes, self.dataset = p, list(pairs), list(hashes), dataset

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        (image_name, mask_name), ds = self.pairs[i], self.dataset
        image_bytes = read_checked(self.p.images / image_name, self.hashes[2 * i], image_name, ds)
        mask_bytes = read_checked(self.p.masks / mask_name, self.hashes[2 * i + 1], mask_name, ds)
        x, m = decode_pair(image_bytes, mask_bytes, image_name, mask_name, self.p, ds)
        return {"image": x, "label": torch.tensor(0), "mask": m}


class ImageMaskFolder(Dataset):
    """2D images and segmentation masks from two folders, matched by file stem."""

    name = "image-mask-folder"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2})
    Params = ImageMaskFolderParams

    def load(self) -> LoadedData:
        p: ImageMaskFolderParams = self.params
        ds = self.name
        check_folder(p.images, "images", ds)
        check_folder(p.masks, "masks", ds)
        image_names = list_files(p.images, IMAGE_SUFFIXES, ds)
        mask_names = list_files(p.masks, MASK_SUFFIXES + LOSSY_SUFFIXES, ds)
        if not image_names:
            raise DataError(f"{ds}: no images ({', '.join(IMAGE_SUFFIXES)}) in {p.images}")
        if not mask_names:
            raise DataError(f"{ds}: no masks ({', '.join(MASK_SUFFIXES)}) in {p.masks}")
        stem = lambda name: Path(name).stem  # noqa: E731
        pairs = match_by_key(
            index_by_key(image_names, stem, "image", ds), index_by_key(mask_names, stem, "mask", ds), "image", "mask", ds
        )
        unmatched_masks = len(mask_names) - len(pairs)
        if p.max_cases is not None:
            pairs = pairs[: p.max_cases]

        hashes: list[tuple[str, str]] = []
        shape: tuple[int, ...] | None = None
        low, high, max_label = math.inf, -math.inf, 0
        for image_name, mask_name in pairs:  # the load pass: every pair is read and checked, then dropped
            if Path(mask_name).suffix.lower() in LOSSY_SUFFIXES:
                raise DataError(f"{ds}: mask {mask_name} is a JPEG; JPEG is lossy and alters labels, save masks as PNG")
            image_bytes, image_hash = read_bytes(p.images / image_name)
            mask_bytes, mask_hash = read_bytes(p.masks / mask_name)
            hashes += [("images/" + image_name, image_hash), ("masks/" + mask_name, mask_hash)]
            x, m = decode_pair(image_bytes, mask_bytes, image_name, mask_name, p, ds)
            if p.size is None and shape is not None and tuple(m.shape) != shape[1:]:
                raise DataError(
                    f"{ds}: image {image_name} is {m.shape[0]}x{m.shape[1]} but earlier images are "
                    f"{shape[1]}x{shape[2]}; set size to resize them all"
                )
            shape = shape or tuple(x.shape)
            if x.numel():
                low, high = min(low, float(x.min())), max(high, float(x.max()))
            if m.numel():
                max_label = max(max_label, int(m.max()))

        if p.mask_values is not None:
            max_label = max(max_label, len(p.mask_values) - 1)
        names = mask_class_names(max_label, p.class_names, ds)
        fingerprint = fingerprint_of(hashes, p.model_dump(mode="json", exclude={"images", "masks"}))
        key = pseudonym_key(h for _, h in hashes)
        case_ids = [pseudonym(key, image_name) for image_name, _ in pairs]
        sensitive: dict[str, str] = {}
        for (image_name, mask_name), case in zip(pairs, case_ids):
            sensitive |= file_name_values(image_name, f"file name of case {case}")
            sensitive |= file_name_values(mask_name, f"mask file name of case {case}")
        n, (c, h, w) = len(pairs), shape
        description = (
            f"{ds}: {n} cases, {c} x {h} x {w} ({'grayscale' if c == 1 else 'RGB'}"
            f"{f', resized to {p.size} x {p.size}' if p.size is not None else ''}), "
            f"intensity range [{low:.3g}, {high:.3g}], "
            f"{len(names)} mask classes"
            + (f"; {unmatched_masks} masks without an image were ignored" if unmatched_masks else "")
        )
        return LoadedData(
            images=None,
            cases=ImageMaskCases(p, pairs, [h for _, h in hashes], ds),
            image_shape=shape,
            labels=torch.zeros(n, dtype=torch.long),
            case_ids=case_ids,
            class_names=["image"],
            fingerprint=fingerprint,
            mask_class_names=names,
            description=description,
            sensitive_values=drop_public(sensitive, ["image", *names]),
        )


# -- image-folder ------------------------------------------------------------------------


class ImageFolderParams(ClassFolderParams):
    path: InputPath = Field(
        description="Root folder with one subfolder of 2D images (png, tif, bmp, jpg) per class; class folders are "
        "not searched recursively."
    )
    grayscale: bool = grayscale_field()
    size: int | None = size_field()
    max_cases: int | None = Field(
        None,
        ge=1,
        description="Read only this many images, taken in turn from each class (by file name within a class), so a "
        "small sample still covers every class.",
    )


class ImageFolder(Dataset):
    """2D images in one subfolder per class (root/<class>/<image>); the subfolder is the label."""

    name = "image-folder"
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({2})
    Params = ImageFolderParams

    def load(self) -> LoadedData:
        p: ImageFolderParams = self.params
        ds = self.name
        check_folder(p.path, "root", ds)
        classes, ignored_folders = class_folders(p.path, p.classes, ds)
        per_class: list[list[str]] = []
        ignored_files = 0
        for cls in classes:
            folder = p.path / cls
            names = sorted(list_files(folder, IMAGE_SUFFIXES, ds))
            if not names:
                raise DataError(f"{ds}: class folder {cls!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            ignored_files += sum(1 for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")) - len(names)
            per_class.append([f"{cls}/{name}" for name in names])

        cases: list[tuple[int, str]] = []  # (label, class/file), taken in turn from each class
        total = sum(len(files) for files in per_class)
        limit = total if p.max_cases is None else min(p.max_cases, total)
        for i in range(max(len(files) for files in per_class)):
            for label, files in enumerate(per_class):
                if i < len(files) and len(cases) < limit:
                    cases.append((label, files[i]))
        if p.max_cases is None:
            cases.sort()  # class by class, by file name

        hashes, stored, shape, value_range = scan_images(p.path, [rel for _, rel in cases], p, ds)
        labels = torch.tensor([label for label, _ in cases], dtype=torch.long)
        key = pseudonym_key(h for _, h in hashes)
        case_ids = {rel: pseudonym(key, rel) for _, rel in cases}
        sensitive: dict[str, str] = {}
        for rel in (rel for files in per_class for rel in files):
            source = f"file name of case {case_ids[rel]}" if rel in case_ids else "file name of an image not audited"
            sensitive |= file_name_values(rel.split("/", 1)[1], source)
        sensitive = drop_public(sensitive, classes)
        extra = []
        if len(cases) < total:
            extra.append(f"{len(cases)} of {total} images (max_cases)")
        if ignored_files:
            extra.append(f"{ignored_files} non-image files ignored")
        if ignored_folders:
            extra.append(f"{ignored_folders} subfolders not in classes ignored")
        return LoadedData(
            images=None,
            cases=ImageFileCases(p.path, *zip(*hashes), labels, p.grayscale, p.size, ds),  # rels, sha256s
            image_shape=shape,
            labels=labels,
            case_ids=list(case_ids.values()),
            class_names=list(classes),
            fingerprint=fingerprint_of(hashes, p.model_dump(mode="json", exclude={"path"})),
            description=describe(ds, classes, labels, shape, value_range, stored, p.size, extra, sensitive),
            sensitive_values=sensitive,
        )


@hookimpl
def register_datasets(register):
    register(ImageFolder)
    register(ImageMaskFolder)
