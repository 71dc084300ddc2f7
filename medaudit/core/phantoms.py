"""Synthetic CT-like chest slices (no download, no patients), the generator behind the
``phantom`` dataset and the demo models.

Each image is an axial-slice caricature: an elliptical body of soft tissue, two dark
lungs, a bright vertebra and, in a fraction of cases, a small nodule in one lung. The
classification label says whether the nodule is present; the mask labels every
structure. Images are fully determined by the params (same seed, same images on every
machine), so audits on them are reproducible end to end. It lives in core because the
demo models train on it and the dataset plugin serves it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from medaudit.core.components import Params

CLASS_NAMES = ["normal", "nodule"]
MASK_CLASSES = ["background", "body", "lung", "bone", "nodule"]


class PhantomParams(Params):
    n: int = Field(128, ge=1, le=100_000, description="Number of slices.")
    size: int = Field(64, ge=16, le=1024, description="Height and width in pixels.")
    seed: int = Field(0, ge=0, description="Seed of the generator; different seeds give disjoint sets.")
    nodule_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of slices with a nodule.")
    nodule_contrast: float = Field(0.25, gt=0.0, le=0.8, description="Nodule intensity above lung, in [0, 1] units.")
    noise: float = Field(0.03, ge=0.0, le=0.5, description="Std of additive Gaussian noise.")
    depth: int | None = Field(
        None, ge=4, le=512, description="Slices per volume: set it for 3D volumes (N x 1 x depth x size x size); unset for 2D slices."
    )


def _ellipse(xx, yy, cx, cy, ax, ay, sharp, zz=0.0, az=float("inf"), cz=0.0):
    """Soft ellipse (ellipsoid when ``az`` is finite) membership in [0, 1] (sigmoid edge),
    broadcast over a batch."""
    r = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2
    return torch.sigmoid((1.0 - r) * sharp)


def make_phantoms(p: PhantomParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return images ``N x 1 x S x S`` in [0, 1], labels ``N``, masks ``N x S x S``; with
    ``depth`` set, volumes ``N x 1 x D x S x S`` and masks ``N x D x S x S``.

    In 3D the body and vertebra are cylinders along the depth axis, the lungs ellipsoids
    spanning most of it, and the nodule a sphere at a random depth.
    """
    g = torch.Generator().manual_seed(p.seed)
    n, s = p.n, p.size
    dims = 1 if p.depth is None else 2  # trailing singleton dims of the per-case draws

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, *([1] * (dims + 1)), generator=g))

    coords = torch.linspace(-1.0, 1.0, s)
    if p.depth is None:
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        zz = torch.zeros(())
    else:
        zz, yy, xx = torch.meshgrid(torch.linspace(-1.0, 1.0, p.depth), coords, coords, indexing="ij")
    sharp = 0.6 * s  # edge width of about one pixel whatever the size

    body_cx, body_cy = u(-0.05, 0.05), u(-0.05, 0.05)
    body_ax, body_ay = u(0.75, 0.92), u(0.55, 0.72)
    body = _ellipse(xx, yy, body_cx, body_cy, body_ax, body_ay, sharp)

    lung_ax, lung_ay = body_ax * u(0.28, 0.34), body_ay * u(0.55, 0.7)
    lung_dx = body_ax * u(0.4, 0.48)
    lung_cy = body_cy - body_ay * u(0.05, 0.15)
    lung_az = float("inf") if p.depth is None else 1.1  # 3D: tapering towards the ends
    left = _ellipse(xx, yy, body_cx - lung_dx, lung_cy, lung_ax, lung_ay, sharp, zz, lung_az)
    right = _ellipse(xx, yy, body_cx + lung_dx, lung_cy, lung_ax, lung_ay, sharp, zz, lung_az)
    lungs = torch.clamp(left + right, max=1.0)

    spine_r = u(0.07, 0.1)
    spine = _ellipse(xx, yy, body_cx, body_cy + body_ay * 0.72, spine_r, spine_r, sharp)

    has_nodule = torch.rand(n, generator=g) < p.nodule_fraction
    side = torch.where(torch.rand(n, *([1] * (dims + 1)), generator=g) < 0.5, -1.0, 1.0)
    nod_cx = body_cx + side * lung_dx + lung_ax * u(-0.45, 0.45)
    nod_cy = lung_cy + lung_ay * u(-0.55, 0.55)
    nod_r = u(0.05, 0.09).clamp_min(3.0 / s)  # at least 1.5 px in radius at any size
    if p.depth is None:
        nod_az, nod_cz = float("inf"), 0.0
    else:  # a sphere: the radius in depth units covers as many slices as pixels in-plane
        nod_az, nod_cz = nod_r * s / p.depth * 2, u(-0.4, 0.4)
        nod_az = nod_az.clamp_min(1.5 * 2 / p.depth)
    nodule = _ellipse(xx, yy, nod_cx, nod_cy, nod_r, nod_r, sharp, zz, nod_az, nod_cz)
    nodule = nodule * lungs * has_nodule.view(n, *([1] * (dims + 1)))

    tissue = u(0.42, 0.5)
    image = body * tissue
    image = image + lungs * (u(0.06, 0.12) - tissue)
    image = image + nodule * p.nodule_contrast
    image = image + spine * (u(0.85, 0.95) - image)
    image = image.expand(n, *xx.shape) + p.noise * torch.randn(n, *xx.shape, generator=g)
    image = image.clamp(0.0, 1.0).unsqueeze(1).contiguous()

    body, lungs, spine, nodule = (t.expand(n, *xx.shape) for t in (body, lungs, spine, nodule))
    mask = torch.zeros(n, *xx.shape, dtype=torch.long)
    mask[body > 0.5] = 1
    mask[lungs > 0.5] = 2
    mask[spine > 0.5] = 3
    mask[nodule > 0.5] = 4
    return image, has_nodule.long(), mask
