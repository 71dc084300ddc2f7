"""Target masks for targeted segmentation attacks, declared in the spec.

A targeted segmentation attack steers the prediction towards a label map chosen by the
auditor. The choices a clinical risk analysis asks about:

- ``other_case``: another case's ground truth (ASMA's and DAG's protocol). Each case gets
  the candidate mask that differs most from its own (lowest foreground Dice), among
  ``candidates`` masks spread evenly over the evaluation data.
- ``shape``: the case's own truth with a disc (circle/sphere) or square (cube) of class
  ``cls`` painted at ``centre``: a fake finding.
- ``remove_class``: every pixel of class ``cls`` relabelled ``fill`` (default: the class
  most frequent around it): e.g. erase the lesion.
- ``grow_class``: class ``cls`` dilated by ``grow`` pixels over its neighbours: e.g. an
  enlarged tumour.

Targets depend only on the case's truth (and the prepared candidates), never on the
batch, so they are the same whatever the batch size and on resume.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medaudit.core.components import Params
from medaudit.core.lazy import torch
from medaudit.core.segmentation import dice_per_class, dilate, foreground_mean, one_hot


class TargetMask(Params):
    mode: Literal["other_case", "shape", "remove_class", "grow_class"] = Field(
        "other_case", description="How the target label map is made from the case's truth (see medaudit.core.targets)."
    )
    cls: int | None = Field(
        None, ge=0, description="Class to paint (shape), erase (remove_class) or grow (grow_class); default the last class."
    )
    fill: int | None = Field(None, ge=0, description="remove_class: class that replaces it; default the most frequent class around it.")
    grow: int = Field(3, ge=1, le=64, description="grow_class: dilation radius in pixels (voxels).")
    shape: Literal["disc", "square"] = Field("disc", description="shape: a disc (sphere in 3D) or a square (cube).")
    size: float = Field(0.2, gt=0, le=1, description="shape: diameter (side) as a fraction of the image side.")
    centre: tuple[float, float] = Field(
        (0.5, 0.5), description="shape: centre as fractions of (height, width); in 3D the depth centre is the middle slice."
    )
    candidates: int = Field(16, ge=1, le=1024, description="other_case: number of candidate masks taken from the data.")


class TargetMaker:
    """Makes target maps for a batch of truths under one :class:`TargetMask` setting."""

    def __init__(self, params: TargetMask, num_classes: int):
        self.params = params
        self.num_classes = num_classes
        self.cls = params.cls if params.cls is not None else num_classes - 1
        if self.cls >= num_classes or (params.fill is not None and params.fill >= num_classes):
            raise ValueError(f"target class out of range: the model has {num_classes} classes")
        self.pool: torch.Tensor | None = None
        #: ``other_case``: index in the evaluation data of each candidate in :attr:`pool`.
        self.pool_index: torch.Tensor | None = None

    def prepare(self, masks: torch.Tensor | None) -> None:
        """Take the ``other_case`` candidates from the evaluation data's masks."""
        if self.params.mode != "other_case":
            return
        if masks is None or len(masks) < 2:
            raise ValueError("target mode other_case needs at least two cases with masks")
        n = min(self.params.candidates, len(masks))
        self.pool_index = torch.linspace(0, len(masks) - 1, n).round().long()
        self.pool = masks[self.pool_index].clone()

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.choose(y)[0]

    def choose(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets for the truths ``y`` and, for ``other_case``, the position in :attr:`pool`
        of each case's chosen candidate (``pool_index[index]`` is its index in the data the
        maker was prepared with, e.g. to fetch that case's image); None for other modes."""
        mode = self.params.mode
        if mode == "other_case":
            return self._other_case(y)
        if mode == "shape":
            return self._shape(y), None
        if mode == "remove_class":
            return self._remove(y), None
        return torch.where(dilate(y == self.cls, self.params.grow), torch.full_like(y, self.cls), y), None

    def _other_case(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is None:
            raise RuntimeError("TargetMaker.prepare() must be called before other_case targets are made")
        pool = self.pool.to(y.device)
        if pool.shape[1:] != y.shape[1:]:
            raise ValueError(f"candidate masks are {tuple(pool.shape[1:])} but the batch is {tuple(y.shape[1:])}")
        # Dice of every (case, candidate) pair; identical masks score 1 and are never chosen
        # unless every candidate is identical.
        scores = torch.stack([
            foreground_mean(dice_per_class(y, cand.expand_as(y), self.num_classes)) for cand in pool
        ], 1)
        index = scores.argmin(1)
        return pool[index], index

    def _shape(self, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        spatial = y.shape[1:]
        grids = torch.meshgrid(*[torch.arange(s, device=y.device, dtype=torch.float32) for s in spatial], indexing="ij")
        centre = ([(spatial[0] - 1) / 2] if len(spatial) == 3 else []) + [
            c * (s - 1) for c, s in zip(p.centre, spatial[-2:])
        ]
        radius = p.size * min(spatial[-2:]) / 2
        offsets = [(g - c).abs() for g, c in zip(grids, centre)]
        inside = (
            sum(o**2 for o in offsets) <= radius**2 if p.shape == "disc" else torch.stack(offsets).amax(0) <= radius
        )
        return torch.where(inside.expand_as(y), torch.full_like(y, self.cls), y)

    def _remove(self, y: torch.Tensor) -> torch.Tensor:
        region = y == self.cls
        if self.params.fill is not None:
            fill = torch.full_like(y, self.params.fill)
        else:
            ring = dilate(region, 2) & ~region
            counts = (one_hot(y, self.num_classes) & ring[:, None]).flatten(2).sum(2)
            counts[:, self.cls] = -1
            fill = counts.argmax(1).view(-1, *([1] * (y.dim() - 1))).expand_as(y)
        return torch.where(region, fill, y)
