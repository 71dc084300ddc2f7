"""Attacks: gradient (FGSM, PGD and the iterative family), AutoAttack and its segmentation
version, minimum-norm, targeted segmentation, one-pixel, watermark, universal, and the ART
bridge. ``_apgd`` holds the APGD and Square building blocks."""
