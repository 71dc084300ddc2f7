"""Write the files of the ONNX + DICOM example: a model file and a DICOM folder to audit.

    python examples/onnx-dicom/make_files.py OUTDIR [--n 128]
    medaudit run OUTDIR/audit.yaml

Writes, into OUTDIR (new or empty):

* ``demo-classifier.onnx``: the built-in ``demo`` classifier (trained on first use, then
  cached; see ``medaudit.plugins.models.demo``) with its normalisation, exported with
  ``torch.onnx.export`` and a dynamic batch axis; it takes pixel-space input in [0, 1].
* ``dicom/normal/*.dcm`` and ``dicom/nodule/*.dcm``: ``--n`` phantom slices (the built-in
  ``phantom`` dataset, seed 0: disjoint from the demo model's training slices) as
  single-frame CT DICOM files. A pixel value v in [0, 1] is stored as round(1400 v) with
  Rescale Intercept -1000, i.e. -1000 to 400 HU; the spec's window [-300, 1400] maps that
  back to [0, 1]. Every header value that could identify a patient is made up and
  obviously so (patient name ``Fakename^Fakegiven``, ids ``FAKEID0001``...).
* ``audit.yaml``: ``examples/onnx-dicom/audit.yaml`` with the ONNX file's sha256 pinned.

Needs ``pip install 'medaudit[onnx]'`` (onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medaudit.core.components import Task
from medaudit.core.models import file_sha256
from medaudit.plugins.models.demo import DemoModel, DemoParams
from medaudit.plugins.models.onnx import export_onnx
from medaudit.plugins.datasets.phantom import CLASS_NAMES, Phantom, PhantomParams

TEMPLATE = Path(__file__).with_name("audit.yaml")
#: Stored value = round(STORED_MAX * pixel); HU = stored + INTERCEPT.
STORED_MAX, INTERCEPT = 1400, -1000


def write_slice(path: Path, image: np.ndarray, index: int) -> None:
    """One single-frame CT file (explicit VR little endian) with made-up patient attributes."""
    stored = np.rint(np.clip(image, 0.0, 1.0) * STORED_MAX).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName = "Fakename^Fakegiven"
    ds.PatientID = f"FAKEID{index:04d}"
    ds.PatientBirthDate = "19000101"
    ds.PatientSex = "O"
    ds.StudyDate = "20000101"
    ds.InstitutionName = "Fictional Test Site"
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, INTERCEPT, "HU"
    ds.WindowCenter, ds.WindowWidth = -300, 1400
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="Folder to write to (new or empty).")
    parser.add_argument("--n", type=int, default=128, help="Number of DICOM slices (default 128).")
    args = parser.parse_args(argv)
    out: Path = args.outdir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} exists and is not an empty folder")

    model = DemoModel(DemoParams()).load(Task.CLASSIFICATION)
    onnx_path = export_onnx(model.module, torch.rand(2, 1, 64, 64), out / "demo-classifier.onnx")
    digest = file_sha256(onnx_path)

    data = Phantom(PhantomParams(n=args.n, size=64, seed=0)).load()
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
        write_slice(out / "dicom" / CLASS_NAMES[label] / f"slice-{i:04d}.dcm", image[0].numpy(), i)

    spec = re.sub(r"sha256: null.*", f"sha256: {digest}", TEMPLATE.read_text(encoding="utf-8"), count=1)
    (out / "audit.yaml").write_text(spec, encoding="utf-8")
    counts = ", ".join(f"{name}: {int((data.labels == k).sum())}" for k, name in enumerate(CLASS_NAMES))
    print(f"wrote {onnx_path} (sha256 {digest})")
    print(f"wrote {len(data)} DICOM slices under {out / 'dicom'} ({counts})")
    print(f"run the audit with: medaudit run {out / 'audit.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
