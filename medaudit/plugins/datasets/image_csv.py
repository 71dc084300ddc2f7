"""Datasets: image-csv.

2D images from one folder with their class labels from a CSV file.

Most 2D classification sets (dermoscopy, fundus, chest X-ray exports, histology tiles) are
shipped either as a folder of images plus a table of labels, or as one subfolder of
images per class. Both are read here with the reading code of ``image-mask-folder``
(:func:`medaudit.plugins.datasets._files.image_array`): PNG, TIFF, BMP and JPEG; 8-bit
images scaled by 1/255, 16-bit ones by 1/65535, float TIFFs taken as they are (they must
lie in [0, 1]; NaN and Inf are refused); ``grayscale`` gives one channel, otherwise
three (RGB); ``size`` resizes to size x size (bilinear, antialiased), and without it all
images must share one shape.

Privacy follows ``image-mask-folder``: case ids are pseudonyms of the file's path
(relative to the images folder or the class folder) keyed with a secret derived from
the files' contents; the names, stems and folder names of the files go into
:attr:`LoadedData.sensitive_values` (class names excepted, since the report shows them, and
ordinary names such as ``2000.png`` or ``summary.png``: :func:`medaudit.core.privacy.ordinary`),
so the run refuses to write an output that holds one. Error messages name the file: they
go to the user's own console only; a CSV row whose file leads outside the images folder
(through a symbolic link) is refused by its line number.
"""

from __future__ import annotations

import csv
import re
from pathlib import PurePosixPath

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Dataset, InputPath, LoadedData, Params, Task
from medaudit.core.errors import DataError
from medaudit.core.lazy import torch
from medaudit.core.models import file_sha256
from medaudit.core.privacy import drop_public, file_name_values, pseudonym, pseudonym_key
from medaudit.plugins.datasets._files import (
    IMAGE_SUFFIXES,
    ImageFileCases,
    check_class_names,
    check_folder,
    describe,
    fingerprint_of,
    grayscale_field,
    inside,
    list_files,
    scan_images,
    size_field,
)

_INTEGER = re.compile(r"[+-]?\d+")


# -- image-csv ---------------------------------------------------------------------------


class ImageCsvParams(Params):
    images: InputPath = Field(description="Folder of 2D images (png, tif, bmp, jpg) that the CSV's file column names.")
    labels_csv: InputPath = Field(
        description="CSV file (UTF-8, first row = column names) with one row per image: its file and its label."
    )
    file_column: str = Field(
        "file",
        min_length=1,
        description="Column holding each image's path relative to the images folder (e.g. x.png or sub/x.png).",
    )
    label_column: str = Field(
        "label", min_length=1, description="Column holding each image's label: a class name or a class index (0, 1, ...)."
    )
    classes: list[str] | None = Field(
        None,
        description="Class names in label order (0, 1, ...); CSV labels may be these names or their indices. "
        "Default: the sorted distinct labels when they are names, class0..classK-1 when they are all indices.",
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator of the CSV (e.g. ';' or a tab).")
    ignore_unlisted: bool = Field(
        False,
        description="Ignore images in the images folder that have no row in the CSV (counted in the description); "
        "default: such an image is an error, since a forgotten label would silently shrink the evaluation set.",
    )
    grayscale: bool = grayscale_field()
    size: int | None = size_field()
    max_cases: int | None = Field(None, ge=1, description="Read only the first cases (sorted by file path).")
    covariate_columns: list[str] = Field(
        [],
        description="Other CSV columns kept as per-case covariates (site, scanner, sex, age band...), which the "
        "records then hold for breakdowns. Named one by one, since any column written to the outputs must not "
        "identify a patient.",
    )

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str] | None) -> list[str] | None:
        return check_class_names(value)


def _csv_rows(p: ImageCsvParams, dataset: str) -> list[tuple[int, str, str, dict[str, str]]]:
    """(line number, file, label, covariates) of every non-empty row of the CSV, stripped;
    covariates maps each of ``covariate_columns`` to the row's value."""
    path, name = p.labels_csv, p.labels_csv.name
    if not path.is_file():
        raise DataError(f"{dataset}: labels_csv not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=p.delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{dataset}: labels_csv {name} is empty; it needs a header row naming its columns")
            header = [h.strip() for h in header]
            columns = {}
            wanted = [("file_column", p.file_column), ("label_column", p.label_column)]
            wanted += [(f"covariate_columns[{i}]", c) for i, c in enumerate(p.covariate_columns)]
            for what, column in wanted:
                found = [i for i, h in enumerate(header) if h == column]
                if not found:
                    raise DataError(
                        f"{dataset}: labels_csv {name} has no column {column!r} (columns: "
                        f"{', '.join(repr(h) for h in header)}); set {what}"
                    )
                if len(found) > 1:
                    raise DataError(f"{dataset}: labels_csv {name} has {len(found)} columns named {column!r}")
                columns[what if what in ("file_column", "label_column") else column] = found[0]
            rows = []
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue
                line = reader.line_num
                if len(fields) <= max(columns.values()):
                    raise DataError(
                        f"{dataset}: labels_csv {name} line {line} has {len(fields)} fields but the header has "
                        f"{len(header)}"
                    )
                extra = {c: fields[columns[c]].strip() for c in p.covariate_columns}
                rows.append((line, fields[columns["file_column"]].strip(), fields[columns["label_column"]].strip(), extra))
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{dataset}: cannot read labels_csv {name}: {type(exc).__name__}: {exc}") from None
    if not rows:
        raise DataError(f"{dataset}: labels_csv {name} has no rows below its header; the data set is empty")
    return rows


def _labels(rows: list[tuple[int, str, str]], classes: list[str] | None, csv_name: str, dataset: str):
    """Label indices of the rows and the class names (see ImageCsvParams.classes)."""
    for line, _, label in rows:
        if not label:
            raise DataError(f"{dataset}: labels_csv {csv_name} line {line} has no label")
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        out = []
        for line, _, label in rows:
            if label in index:
                out.append(index[label])
            elif _INTEGER.fullmatch(label) and 0 <= int(label) < len(classes):
                out.append(int(label))
            else:
                raise DataError(
                    f"{dataset}: labels_csv {csv_name} line {line} has label {label!r}, which is neither one of "
                    f"classes ({', '.join(classes)}) nor an index 0 to {len(classes) - 1}"
                )
        return out, list(classes)
    if all(_INTEGER.fullmatch(label) for _, _, label in rows):
        values = [int(label) for _, _, label in rows]
        for (line, _, label), value in zip(rows, values):
            if value < 0:
                raise DataError(f"{dataset}: labels_csv {csv_name} line {line} has negative label {label}")
        return values, [f"class{i}" for i in range(max(values) + 1)]
    names = sorted({label for _, _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return [index[label] for _, _, label in rows], names


class ImageCsv(Dataset):
    """2D images from one folder with their class labels from a CSV file (one row per image)."""

    name = "image-csv"
    tasks = frozenset({Task.CLASSIFICATION})
    dims = frozenset({2})
    Params = ImageCsvParams

    def load(self) -> LoadedData:
        p: ImageCsvParams = self.params
        ds = self.name
        check_folder(p.images, "images", ds)
        rows = _csv_rows(p, ds)
        csv_name = p.labels_csv.name

        listed: dict[str, int] = {}
        cases: list[tuple[str, int, str]] = []  # (file, line, label)
        covariates: dict[str, dict[str, str]] = {}
        for line, value, label, extra in rows:
            if not value:
                raise DataError(f"{ds}: labels_csv {csv_name} line {line} has no file")
            rel = PurePosixPath(value.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", value):
                raise DataError(
                    f"{ds}: labels_csv {csv_name} line {line}: file {value!r} must be a path relative to the images "
                    "folder"
                )
            key = rel.as_posix()
            if key in listed:
                raise DataError(f"{ds}: labels_csv {csv_name} lists file {key} twice (lines {listed[key]} and {line})")
            listed[key] = line
            inside(p.images, p.images / key, f"{ds}: labels_csv {csv_name} line {line}: its file")
            if not (p.images / key).is_file():
                raise DataError(f"{ds}: labels_csv {csv_name} line {line} names {key}, which is not in {p.images}")
            cases.append((key, line, label))
            covariates[key] = extra

        unlisted = sorted(set(list_files(p.images, IMAGE_SUFFIXES, ds)) - set(listed))
        if unlisted and not p.ignore_unlisted:
            raise DataError(
                f"{ds}: {len(unlisted)} image{'s' if len(unlisted) > 1 else ''} in {p.images} "
                f"{'have' if len(unlisted) > 1 else 'has'} no row in {csv_name} (first: {unlisted[0]}); add rows for "
                "them or set ignore_unlisted: true"
            )
        label_index, classes = _labels([(line, rel, label) for rel, line, label in cases], p.classes, csv_name, ds)
        order = sorted(range(len(cases)), key=lambda i: cases[i][0])
        if p.max_cases is not None:
            order = order[: p.max_cases]
        rels = [cases[i][0] for i in order]
        labels = torch.tensor([label_index[i] for i in order], dtype=torch.long)

        hashes, stored, shape, value_range = scan_images(p.images, rels, p, ds)
        csv_hash = file_sha256(p.labels_csv)
        all_hashes = [("images/" + rel, h) for rel, h in hashes] + [("labels_csv", csv_hash)]
        key = pseudonym_key(h for _, h in all_hashes)
        case_ids = {rel: pseudonym(key, rel) for rel in rels}
        sensitive: dict[str, str] = {}
        for rel in [*listed, *unlisted]:
            source = f"file name of case {case_ids[rel]}" if rel in case_ids else "file name of an image not audited"
            sensitive |= file_name_values(rel, source)
        sensitive = drop_public(sensitive, classes)
        extra = []
        if len(rels) < len(cases):
            extra.append(f"first {len(rels)} of {len(cases)} listed images (max_cases)")
        if unlisted:
            extra.append(f"{len(unlisted)} images without a row in the CSV ignored")
        return LoadedData(
            images=None,
            cases=ImageFileCases(p.images, *zip(*hashes), labels, p.grayscale, p.size, ds),  # rels, sha256s
            image_shape=shape,
            labels=labels,
            case_ids=list(case_ids.values()),
            class_names=classes,
            fingerprint=fingerprint_of(all_hashes, p.model_dump(mode="json", exclude={"images", "labels_csv"} | (
                set() if p.covariate_columns else {"covariate_columns"}))),  # unchanged for sets without covariates
            description=describe(ds, classes, labels, shape, value_range, stored, p.size, extra, sensitive),
            sensitive_values=sensitive,
            covariates=[covariates[rel] for rel in rels] if p.covariate_columns else None,
        )


@hookimpl
def register_datasets(register):
    register(ImageCsv)
