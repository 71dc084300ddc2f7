"""Datasets: where the audited images come from (synthetic phantoms, image folders and
CSV labels, NIfTI, DICOM, MedMNIST). ``_files`` and ``_dicom`` hold the shared reading
helpers."""
