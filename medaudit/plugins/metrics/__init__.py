"""Metrics computed from per-sample records: classification (and perturbation sizes) and
segmentation."""
