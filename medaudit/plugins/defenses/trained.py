"""Trained defenses: pgd-at, trades, ssat, nlce.

A copy of the audited model trained (or fine-tuned) on a training split named in the
spec, then audited like any defended model.

``pgd-at`` (Madry et al. 2018), ``trades`` (Zhang et al. 2019) and ``ssat`` (methods.md
10.1) fine-tune a classifier adversarially (:mod:`._adversarial_training`);
``nlce`` inserts non-local context encoders into an smp segmentation network and
fine-tunes them (:mod:`._nlce`).

The training split is a dataset the spec names (``train_data: {dataset, params}``), never
the evaluation data: a split sharing any image with the evaluation data is refused. The
trained weights are cached under the model cache folder (see
:mod:`medaudit.core.cache`), keyed by the audited model's fingerprint, the
defense's params and the training data's fingerprint, so a resumed or repeated audit
reuses them; the run copies them to ``defenses/<label>.pt`` in its run directory, and the
defended model's fingerprint is the sha256 of that file.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import Access, AttackContext, Defense, LoadedData, LoadedModel, Params, Task
from medaudit.core.lazy import torch
from medaudit.core.models import file_sha256, prepare_for_audit
from medaudit.core.cache import cache_dir, save_atomic
from medaudit.plugins.defenses._adversarial_training import PGDATParams, SSATParams, TRADESParams, pgd_at, ssat, trades
from medaudit.plugins.defenses._common import TrainingData, check_disjoint
from medaudit.plugins.defenses._nlce_params import NLCEParams

#: Bump when a training recipe changes, so stale cached weights are not reused.
RECIPE_VERSION = 1


class TrainedDefense(Defense):
    """A defended model that is a trained copy of the audited one (see the module docstring)."""

    def prepare(self, context: AttackContext) -> None:
        ref: TrainingData = self.params.train_data
        self.train = context.load_dataset(ref.dataset, ref.params)
        self.device = context.device

    def build(self, module: torch.nn.Module) -> torch.nn.Module:
        """Change the architecture before training or loading weights (none by default)."""
        return module

    @abc.abstractmethod
    def fit(self, module: torch.nn.Module, train: LoadedData) -> dict[str, Any]:
        """Train ``module`` in place on ``train``; return facts for the report."""

    def apply(self, model: LoadedModel, data: LoadedData) -> LoadedModel:
        if Access.GRADIENTS not in model.access:
            raise ValueError(f"it trains the model's weights, and this model gives no gradients ({model.access_reason or 'a black box'})")
        check_disjoint(self.train, data)
        config = {"defense": self.name, "params": self.params.model_dump(mode="json"), "model": model.fingerprint,
                  "train": self.train.fingerprint, "recipe": RECIPE_VERSION}
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir() / "defenses" / f"{self.name}-{key}.pt"
        facts_path = path.with_suffix(".json")
        module = self.build(copy.deepcopy(model.module))
        if path.is_file() and facts_path.is_file():
            module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            facts = json.loads(facts_path.read_text(encoding="utf-8"))
        else:
            started = time.perf_counter()
            facts = self.fit(module, self.train)
            facts["train_seconds"] = round(time.perf_counter() - started, 3)
            save_atomic(module.state_dict(), path)
            facts_path.write_text(json.dumps(facts, default=str), encoding="utf-8")
        description = f"{model.description}, {self.name}-trained on {len(self.train)} cases of {self.params.train_data.dataset}"
        return self._defended(model, module, path, file_sha256(path), description, facts)

    def _defended(self, model: LoadedModel, module: torch.nn.Module, path: Path, sha256: str, description: str,
                  facts: dict) -> LoadedModel:
        module.to(next(model.module.parameters()).device)
        return dataclasses.replace(
            model,
            module=prepare_for_audit(module),
            fingerprint=sha256,
            description=description,
            source={**model.source, "trained_checkpoint": str(path), "training": facts},
            adaptive_module=None,
        )

    def export_state(self, defended: LoadedModel) -> dict[str, Any]:
        """The trained weights' checkpoint (path and sha256), not the weights themselves."""
        return {"checkpoint": defended.source["trained_checkpoint"], "sha256": defended.fingerprint,
                "description": defended.description, "facts": defended.source.get("training")}

    def restore(self, model: LoadedModel, data: LoadedData, state: dict[str, Any]) -> LoadedModel:
        """Load the checkpoint :meth:`export_state` names; never train (a missing or changed
        checkpoint is an error: training here would give another process other weights)."""
        path = Path(state["checkpoint"])
        if not path.is_file():
            raise ValueError(f"the trained weights {path} are missing; run the audit again to train them")
        if file_sha256(path) != state["sha256"]:
            raise ValueError(f"the trained weights {path} changed since they were trained (sha256 differs)")
        module = self.build(copy.deepcopy(model.module))
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return self._defended(model, module, path, state["sha256"], state["description"], state["facts"])


class NlceDefenseParams(Params):
    train_data: TrainingData = Field(description="Training split with label maps for the fine-tune.")
    nlce: NLCEParams = Field(default_factory=NLCEParams, description="Where NLCE goes and how it is fine-tuned.")


class Nlce(TrainedDefense):
    """NLCE (He et al. 2019): non-local context encoders inserted into an smp network's
    encoder levels and fine-tuned on the training split (methods.md 2; the design choices
    the paper leaves open are listed in :mod:`medaudit.plugins.defenses._nlce`). Differentiable, so
    the attacks see its exact gradients."""

    name = "nlce"
    tasks = frozenset({Task.SEGMENTATION})
    Params = NlceDefenseParams

    def build(self, module):
        from medaudit.plugins.defenses._nlce import insert_nlce

        return insert_nlce(module, **self.params.nlce.insert_kwargs())

    def fit(self, module, train):
        from medaudit.plugins.defenses._nlce import fine_tune, nlce_parameter_count

        if train.masks is None:
            raise ValueError(f"train_data {self.params.train_data.dataset!r} has no label maps")
        device = next(module.parameters()).device
        facts = fine_tune(module, train.images.to(device), train.masks.to(device), **self.params.nlce.fine_tune_kwargs())
        return dict(facts, parameters_added=nlce_parameter_count(module))


class PgdAtDefenseParams(PGDATParams):
    train_data: TrainingData = Field(description="Labelled training split.")
    seed: int = Field(0, ge=0, description="Seed of the training's shuffling and attacks.")


class TradesDefenseParams(TRADESParams):
    train_data: TrainingData = Field(description="Labelled training split.")
    seed: int = Field(0, ge=0, description="Seed of the training's shuffling and attacks.")


class SsatDefenseParams(SSATParams):
    train_data: TrainingData = Field(description="Labelled training split.")
    unlabeled_data: TrainingData | None = Field(None, description="Unlabelled images (their labels are ignored); none: labelled only.")
    seed: int = Field(0, ge=0, description="Seed of the training's shuffling and attacks.")


class _AdversarialTraining(TrainedDefense):
    """Fine-tunes a copy of the classifier with :attr:`train` (a function of
    :mod:`medaudit.plugins.defenses._adversarial_training`); differentiable, so no adaptive twin."""

    tasks = frozenset({Task.CLASSIFICATION})
    #: Defense params that are not the training function's keyword arguments.
    EXTRA = {"train_data", "seed"}

    def extra_inputs(self, device) -> tuple:
        """Positional inputs the training function takes after the labels (none)."""
        return ()

    def fit(self, module, train):
        device = next(module.parameters()).device
        kwargs = self.params.model_dump(exclude=self.EXTRA)
        generator = torch.Generator().manual_seed(self.params.seed)
        return dict(type(self).train_fn(
            module, train.images.to(device), train.labels.to(device), *self.extra_inputs(device),
            generator=generator, **kwargs,
        ))


class PgdAt(_AdversarialTraining):
    """PGD adversarial training (Madry et al. 2018): fine-tunes a copy of the classifier on
    PGD examples of the training split, within the training budget ``eps``."""

    name = "pgd-at"
    Params = PgdAtDefenseParams
    train_fn = staticmethod(pgd_at)


class Trades(_AdversarialTraining):
    """TRADES (Zhang et al. 2019): fine-tunes a copy of the classifier on clean
    cross-entropy plus ``beta`` times the KL divergence between clean and adversarial outputs."""

    name = "trades"
    Params = TradesDefenseParams
    train_fn = staticmethod(trades)


class Ssat(_AdversarialTraining):
    """SSAT, semi-supervised adversarial training (Li et al. 2021; methods.md 10.1): FGSM
    training on the labelled split plus adversarial pseudo-labels on unlabelled images."""

    name = "ssat"
    Params = SsatDefenseParams
    train_fn = staticmethod(ssat)
    EXTRA = {"train_data", "unlabeled_data", "seed"}

    def prepare(self, context):
        super().prepare(context)
        ref = self.params.unlabeled_data
        self.unlabeled = context.load_dataset(ref.dataset, ref.params) if ref is not None else None

    def extra_inputs(self, device) -> tuple:
        return (self.unlabeled.images.to(device) if self.unlabeled is not None else None,)


@hookimpl
def register_defenses(register):
    for cls in (PgdAt, Trades, Ssat, Nlce):
        register(cls)
