"""Helpers shared by the defenses: the training split a defense names, the check that it is
disjoint from the evaluation data, and the identity of a defended system built by fitting."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medaudit.core.components import Defense, LoadedData, LoadedModel

#: Bump when fitting changes, so a resumed run does not mix fitted systems (detectors, ensembles, routes).
RECIPE_VERSION = 1


class TrainingData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="A registered dataset holding the training split.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params (a split disjoint from the evaluation data).")


def _image_hashes(data: LoadedData) -> set[str]:
    return {hashlib.sha256(image.contiguous().cpu().numpy().tobytes()).hexdigest() for image in data.images}


def check_disjoint(train: LoadedData, data: LoadedData) -> None:
    """Refuse a training split that shares an image with the evaluation data."""
    shared = _image_hashes(train) & _image_hashes(data)
    if shared:
        raise ValueError(f"train_data shares {len(shared)} image(s) with the evaluation data; name a disjoint training split")


def fingerprint(defense: Defense, model: LoadedModel, train: LoadedData | None = None, parts: tuple = ()) -> str:
    """The defended system's identity: what it is built from (fitting is seeded)."""
    config = {"defense": defense.name, "params": defense.params.model_dump(mode="json"), "model": model.fingerprint,
              "train": train.fingerprint if train is not None else None, "parts": list(parts), "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
