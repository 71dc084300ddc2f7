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

import ctypes
import hashlib

from pydantic import Field

from medaudit.core.components import Params
from medaudit.core.lazy import torch

CLASS_NAMES = ["normal", "nodule"]
MASK_CLASSES = ["background", "body", "lung", "bone", "nodule"]


class PhantomParams(Params):
    n: int = Field(128, ge=1, le=100_000, description="Number of slices.")
    size: int = Field(64, ge=16, le=1024, description="Height and width in pixels.")
    seed: int = Field(0, ge=0, description="Seed of the generator; different seeds give disjoint sets.")
    nodule_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of slices with a nodule.")
    nodule_contrast: float = Field(0.25, gt=0.0, le=0.8, description="Nodule intensity above lung, in [0, 1] units.")
    noise: float = Field(0.03, ge=0.0, le=0.5, description="Std of additive Gaussian noise.")
    covariates: bool = Field(
        False, description="Attach per-case covariates: nodule present/absent and its size band (small/large)."
    )
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


#: Cases generated together: block 0 is exactly :func:`make_phantoms` of the first
#: ``min(n, BLOCK)`` cases, so every set of at most BLOCK cases equals the in-memory one.
BLOCK = 256


def block_params(p: PhantomParams, block: int) -> PhantomParams:
    """The generator params of block ``block`` of ``p``'s cases: block 0 uses ``p.seed``,
    later blocks a seed derived from (seed, block), so any block can be made on its own."""
    n = min(BLOCK, p.n - block * BLOCK)
    if n <= 0:
        raise IndexError(f"phantom block {block} is past the {p.n} cases")
    seed = p.seed if block == 0 else int(hashlib.sha256(f"phantom:{p.seed}:{block}".encode()).hexdigest()[:15], 16)
    return p.model_copy(update={"n": n, "seed": seed})


class PhantomCases:
    """The cases of a phantom set, generated on demand a block at a time (index -> case
    dict with image, label, mask): a set of any size is never held whole. Keeps the last
    block made, so reading in order makes each block once (per DataLoader worker)."""

    def __init__(self, p: PhantomParams):
        self.p = p
        self._block: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.p.n

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._block is None or self._block[0] != b:
            self._block = None  # not two blocks at once
            self._block = (b, make_phantoms(block_params(self.p, b)))
            _release_freed_memory()
        return self._block[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.p.n:
            raise IndexError(i)
        images, labels, masks = self.block(i // BLOCK)
        j = i % BLOCK
        return {"image": images[j], "label": labels[j], "mask": masks[j]}

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every case's label and nodule radius, without making any pixels (see :func:`case_draws`)."""
        parts = [case_draws(block_params(self.p, b)) for b in range(-(-self.p.n // BLOCK))]
        return torch.cat([a for a, _ in parts]), torch.cat([r for _, r in parts])


def _release_freed_memory() -> None:
    """Hand the generator's freed temporaries back to the system (glibc keeps them in its
    heap otherwise, and a long stream of blocks would grow the process by fragments)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def case_draws(p: PhantomParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels (``has_nodule``) and nodule radii (fraction of the half-width) that
    :func:`make_phantoms` draws for ``p``, replaying its random draws up to the radius
    without the pixels: the labels of a lazy set are known at load for the cost of a few
    numbers per case. Must follow make_phantoms' draw order (a test compares them)."""
    g = torch.Generator().manual_seed(p.seed)
    shape = (p.n, *([1] * (2 if p.depth is None else 3)))
    for _ in range(9):  # body centre x/y and axes, lung axes, offset and centre, spine radius
        torch.rand(shape, generator=g)
    has_nodule = torch.rand(p.n, generator=g) < p.nodule_fraction
    torch.rand(shape, generator=g)  # side
    torch.rand(shape, generator=g)  # nodule centre x
    torch.rand(shape, generator=g)  # nodule centre y
    radius = (0.05 + (0.09 - 0.05) * torch.rand(shape, generator=g)).clamp_min(3.0 / p.size)
    return has_nodule.long(), radius.flatten()
