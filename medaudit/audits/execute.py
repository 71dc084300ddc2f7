"""Running one job on a range of cases: a pure function of a session and the job.

A :class:`Session` holds what jobs run on (model, data, defended models, prepared attacks,
device, the task's protocol); it is built from serialisable inputs (the resolved spec, its
folder, the run directory), so several processes can each run part of a job. Every random
choice derives from the spec's seed, the attack's seed key and the batch's first case, so
the records of a case do not depend on which process ran it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import medaudit
from medaudit.core.adaptive import bind_labels
from medaudit.core.components import (
    NO_SCREEN, Attack, AttackContext, AttackOutcome, Defense, Facet, LoadedData, LoadedModel, Metric,
)
from medaudit.core.environment import configure_torch, require_torchvision, select_device
from medaudit.core.errors import DataError, SpecError
from medaudit.core.host import Host
from medaudit.core.jobs import NAIVE, Job, Records
from medaudit.core.models import SpeedWrapper, prepare_for_audit
from medaudit.core.norms import perturbation_sizes, recorded_norms
from medaudit.core.quality import psnr, ssim
from medaudit.core.spec import NO_DEFENSE, Spec
from medaudit.core.tasks import TaskProtocol, protocol

#: Where torch's and medaudit's own code lives: a frame outside them may be the audited model's.
LIBRARY_DIRS = tuple(os.path.join(os.path.dirname(m.__file__), "") for m in (torch, medaudit))
#: An attack's extra that records keep as a top-level field (facet MINIMUM_NORM), as before extras existed.
MIN_NORM = "min_norm"


def batch_seed(seed: int, key: str, batch_start: int) -> int:
    """The seed of one batch: from the spec's seed, the attack's seed key (a clean job's
    id) and the batch's first case; the first batch's is the job seed of earlier versions."""
    name = key if batch_start == 0 else f"{key}@{batch_start}"
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def model_frame(module: torch.nn.Module, exc: BaseException) -> str | None:
    """Where the audited model's own code raised ``exc`` (``file:LINE in function``, the
    innermost frame outside torch and medaudit), or None when no frame outside them is the
    model's (then it is a bug in medaudit or a plugin)."""
    own = {id(m) for m in module.modules()}
    outside = [(f, line) for f, line in traceback.walk_tb(exc.__traceback__)
               if not f.f_code.co_filename.startswith(LIBRARY_DIRS)]
    if not any(id(f.f_locals.get("self")) in own for f, _ in outside):
        return None
    frame, line = outside[-1]
    return f"{os.path.basename(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}"


def state_path(run_dir: Path, kind: str, label: str) -> Path:
    """Where a run keeps what a defense (``defenses``) or an attack (``attacks``) fitted."""
    return Path(run_dir) / kind / f"{label}.state.pt"


def view_modules(loaded: LoadedModel) -> dict[str, torch.nn.Module]:
    """Every module an attack differentiates, by view: the deployed one (``naive``) and the defense's views."""
    views = {NAIVE: loaded.module}
    if loaded.adaptive_module is not None:
        views["adaptive"] = loaded.adaptive_module
    return {**views, **loaded.views}


@dataclasses.dataclass
class Session:
    spec: Spec
    host: Host
    device: torch.device
    model: LoadedModel
    data: LoadedData
    #: The audited model (``NO_DEFENSE``) and each defended model, by label.
    models: dict[str, LoadedModel]
    attacks: dict[str, Attack]
    protocol: TaskProtocol
    #: The defenses and what they returned before the speed switches, for :meth:`export_states`.
    defenses: dict[str, tuple[Defense, LoadedModel]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, spec: Spec, host: Host, device: torch.device, *, checks: Callable[[LoadedModel, LoadedData], None] | None = None,
             run_dir: Path | None = None) -> Session:
        """Load data and model, run ``checks`` on them, apply the defenses and prepare the
        attacks; with ``run_dir``, restore what earlier fitted instead of fitting again."""
        torch.manual_seed(spec.runtime.seed)
        build = _Builder(spec, host, device)
        data = build.component("dataset", spec.data.dataset, spec.data.params).load()
        try:
            model = build.component("model", spec.model.loader, spec.model.params).load(spec.task)
        except (ImportError, RuntimeError) as exc:  # timm and smp import torchvision: only they need it
            if "torchvision" in str(exc):
                require_torchvision()  # a torch/torchvision pair that does not match: the pip command that fixes it
            raise
        build.data, build.model = data, model
        model.module.to(device)
        if checks is not None:
            checks(model, data)
        session = cls(spec, host, device, model, data, {NO_DEFENSE: model}, {}, protocol(spec.task))
        context = build.context()
        for i, ref in enumerate(spec.defenses):
            state = _load_state(run_dir, "defenses", ref.label)
            try:
                defense, defended = build.defense(ref.name, ref.params, state)
            except ValueError as exc:
                raise SpecError([f"defenses[{i}]: defense {ref.label!r}: {exc}"], source="plan") from None
            session.defenses[ref.label] = (defense, defended)
            session.models[ref.label] = defended
        session.models = _speed_switches(spec, device, session.models)
        for i, ref in enumerate(spec.attacks):
            session.attacks[ref.label] = attack = build.component("attack", ref.name, ref.params)
            state = _load_state(run_dir, "attacks", ref.label)
            try:
                attack.restore_state(state) if state is not None else attack.prepare(context)
            except ValueError as exc:
                raise SpecError([f"attacks[{i}]: attack {ref.label!r}: {exc}"], source="plan") from None
        return session

    @classmethod
    def open(cls, spec_dict: dict, base_dir: Path | str, run_dir: Path | str, host: Host | None = None) -> Session:
        """A session in another process, from the resolved spec, its folder and the run
        directory (fitted defenses and attacks are restored from it, never fitted again)."""
        import yaml

        from medaudit.core.host import get_host
        from medaudit.core.spec import load_spec_text

        host = host or get_host()
        spec = load_spec_text(yaml.safe_dump(spec_dict), host, Path(base_dir))
        configure_torch(spec.runtime)
        return cls.load(spec, host, select_device(spec.runtime.device), run_dir=Path(run_dir))

    def save_states(self, run_dir: Path) -> None:
        """Keep what the defenses and attacks fitted, for sessions in other processes."""
        for label, (defense, defended) in self.defenses.items():
            if (state := defense.export_state(defended)) is not None:
                _save_state(state_path(run_dir, "defenses", label), state)
        for label, attack in self.attacks.items():
            if (state := attack.export_state()) is not None:
                _save_state(state_path(run_dir, "attacks", label), state)

    def case_metrics(self) -> dict[str, Metric]:
        """The spec's metrics that score each case in the batch loop."""
        metrics = {name: self.host.get("metric", name) for name in self.spec.metrics}
        return {name: cls() for name, cls in metrics.items() if cls.scores_cases}


class Sink:
    """Side outputs of a job (example images, penultimate features); none by default."""

    def scoring(self, job: Job, model: torch.nn.Module, positions: torch.Tensor):
        """A context around each forward pass that scores cases at data set ``positions``."""
        return contextlib.nullcontext()

    def batch(self, job: Job, batch_start: int, x, shown, y, pred, clean_pred, target) -> None:
        """A batch's inputs, inputs as scored, truth, predictions (under attack, clean) and target."""


def execute(session: Session, job: Job, start: int, stop: int, clean: list[dict] | None = None,
            sink: Sink | None = None, batch_size: int | None = None, carried: list[dict | None] | None = None) -> Records:
    """The records of cases ``[start, stop)`` of ``job``, batch by batch (``start`` a multiple
    of the batch size, so batches are the same in any split). ``clean``: the clean job's
    records of the same cases (attack jobs). ``batch_size``: the spec's unless given (smaller
    after running out of memory). ``carried`` (``runtime.strategy: verdict``): per case, an
    earlier job's record of an adversarial that already broke it, or None; such a case is not
    attacked and its record takes the earlier adversarial's outcome over
    (:meth:`TaskProtocol.carry`)."""
    spec, p, sink = session.spec, session.protocol, sink or Sink()
    defended = session.models[job.defense]
    attack = None if job.is_clean else session.attacks[job.spec_attack]
    key = job.id if attack is None else attack.seed_key(job)
    metrics = session.case_metrics()
    facets = set(p.facets)
    facets |= (defended.screen or NO_SCREEN).facets
    facets |= {Facet.CASE_SCORES} if metrics else set()
    facets |= {Facet.COVARIATES} if session.data.covariates is not None else set()
    facets |= {Facet.CARRIED} if carried is not None else set()
    records: list[dict] = []
    cuda = session.device.type == "cuda"
    for b, x, y in session.data.batches(start, stop, batch_size or spec.runtime.batch_size, spec.runtime.workers,
                                        task=spec.task, pin_memory=cuda):
        seed = batch_seed(spec.runtime.seed, key, b)
        torch.manual_seed(seed)
        generator = torch.Generator(device=session.device).manual_seed(seed)
        before = None if clean is None else clean[b - start : b - start + len(x)]
        x, y = x.to(session.device, non_blocking=cuda), y.to(session.device, non_blocking=cuda)
        taken = None if carried is None else carried[b - start : b - start + len(x)]
        rows, found = _batch(session, job, attack, defended, metrics, b, x, y, before, generator, sink, taken)
        facets |= found
        records.extend(rows)
    return Records(records, facets)


def _batch(session: Session, job: Job, attack: Attack | None, defended: LoadedModel, metrics: dict[str, Metric],
           b: int, x, y, clean: list[dict] | None, generator, sink: Sink,
           carried: list[dict | None] | None = None) -> tuple[list[dict], set[Facet]]:
    """Score one batch clean (a clean job) or attack the cases the protocol says (less those
    ``carried`` over from an earlier job) and score them."""
    p, data, model, n = session.protocol, session.data, defended.module, len(x)
    k = session.model.num_classes
    spacing = data.spacing if data.case_spacings is None else data.case_spacings[b : b + n]
    positions = torch.arange(b, b + n, device=x.device)
    screen, facets = defended.screen or NO_SCREEN, set()
    attacked = p.attacked(y, clean, Facet.REJECTION in screen.facets)
    if carried is not None:
        attacked &= torch.tensor([c is None for c in carried], dtype=torch.bool, device=attacked.device)
    idx = attacked.nonzero().flatten()
    threat = session.spec.threat_model.norm
    sizes = {**{norm.value: torch.zeros(n, device=x.device) for norm in recorded_norms(threat)},
             "in_range": torch.ones(n, dtype=torch.bool, device=x.device)}
    shown, target, extras = x, None, {}
    quality: dict[str, list] = {"psnr": [None] * n, "ssim": [None] * n}
    adv_screened: dict[str, list] = {f: [None] * n for f in screen.fields}
    if clean is None:  # a clean job: the inputs as they are
        with torch.inference_mode(), sink.scoring(job, model, positions):
            logits = model(x)
        clean_scores = adv_scores = p.score(logits, y, spacing, k)
        clean_pred = pred = logits.argmax(1)
        case_scores = {name: m.score_cases(pred, y, spacing) for name, m in metrics.items()}
        clean_cases = case_scores
        clean_screened = screen.examine(x)
    else:
        clean_scores = p.clean_scores(clean)
        clean_cases = {name: [r[f"clean_{name}"] for r in clean] for name in metrics}
        clean_pred = p.clean_prediction(clean, x.device)
        pred = clean_pred
        adv_scores = {name: list(v) for name, v in clean_scores.items()}
        clean_screened = {f: [r[f"clean_{f}"] for r in clean] for f in screen.fields}
        if len(idx):
            view = defended.view(job.view)  # what the attack differentiates; predictions are the deployed model's
            x_att, y_att = x[idx], y[idx]
            bind_labels(view, x_att, y_att)  # a detector's joint view needs the labels
            with torch.enable_grad():
                outcome = AttackOutcome.of(attack.perturb(view, x_att, y_att, eps=job.epsilon,
                                                          norm=session.spec.threat_model.norm, generator=generator))
            bind_labels(view, None, None)
            x_adv = outcome.adversarial
            with torch.inference_mode(), sink.scoring(job, model, b + idx):
                logits = model(x_adv)
            scored = p.score(logits, y_att, _take(spacing, idx), k)
            for name, values in scored.items():
                for j, i in enumerate(idx.tolist()):
                    adv_scores[name][i] = values[j]
            pred = logits.argmax(1) if len(idx) == n else clean_pred.clone().index_put_((idx,), logits.argmax(1))
            for f, values in screen.examine(x_adv).items():
                adv_screened[f] = _per_case(values, idx, n)
            delta = (x_adv - x_att).float()
            for name, size in perturbation_sizes(delta, threat).items():
                sizes[name][idx] = size
            sizes["in_range"][idx] = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
            shown = x.clone()
            shown[idx] = x_adv.to(shown.dtype)
            extras = {name: _per_case(values, idx, n) for name, values in outcome.extras.items()}
            decibels = _per_case(psnr(x_adv, x_att), idx, n)  # an unchanged case has no finite PSNR: None
            quality = {"psnr": [None if v is None or math.isinf(v) else v for v in decibels],
                       "ssim": _per_case(ssim(x_adv, x_att), idx, n)}
        for name in attack.extra_names:
            extras.setdefault(name, [None] * n)
        facets.add(Facet.PERCEPTIBILITY)
        target = attack.target_masks(y)
        case_scores = {name: m.score_cases(pred, y, spacing) for name, m in metrics.items()}
    sink.batch(job, b, x, shown, y, pred, clean_pred, target)
    rows = p.rows(y, attacked.tolist(), {name: v.tolist() for name, v in sizes.items()}, clean_scores, adv_scores)
    if MIN_NORM in extras:
        facets.add(Facet.MINIMUM_NORM)
        for row, value in zip(rows, extras.pop(MIN_NORM)):
            row[MIN_NORM] = value
    if extras:
        facets.add(Facet.EXTRAS)
        for i, row in enumerate(rows):
            row["extras"] = {name: values[i] for name, values in extras.items()}
    for f in screen.fields:  # what the defense adds to each case (a detector's score, its rejection)
        for i, row in enumerate(rows):
            row[f"clean_{f}"] = clean_screened[f][i]
            if clean is not None:
                row[f"adv_{f}"] = adv_screened[f][i]
    if Facet.PERCEPTIBILITY in facets:
        for i, row in enumerate(rows):
            row["psnr"], row["ssim"] = quality["psnr"][i], quality["ssim"][i]
    if target is not None:
        facets.add(Facet.TARGET)
        for row, fields in zip(rows, p.target_fields(pred, y, target, spacing, k)):
            row.update(fields)
    for name in metrics:
        for i, row in enumerate(rows):
            row.update({f"clean_{name}": clean_cases[name][i], f"adv_{name}": case_scores[name][i]})
    for i, row in enumerate(rows):
        if data.covariates is not None:
            row["covariates"] = data.covariates[b + i]
        row["case"] = data.case_ids[b + i]
    if carried is not None:
        rows = [row if source is None else p.carry(row, source, threat) for row, source in zip(rows, carried)]
        for row in rows:
            row.setdefault("carried", None)
    return rows, facets


def _per_case(values: Any, idx: torch.Tensor, n: int) -> list:
    """An attack's extra for the attacked cases, spread over the batch (None elsewhere)."""
    values = values.tolist() if torch.is_tensor(values) else list(values)
    out: list = [None] * n
    for j, i in enumerate(idx.tolist()):
        out[i] = values[j]
    return out


def _take(spacing: Any, idx: torch.Tensor) -> Any:
    """The spacings of the attacked cases (a shared spacing stays as it is)."""
    return [spacing[i] for i in idx.tolist()] if isinstance(spacing, list) else spacing


# -- loading ----------------------------------------------------------------------------


class _Builder:
    """Builds registered components for a session, on its device."""

    def __init__(self, spec: Spec, host: Host, device: torch.device):
        self.spec, self.host, self.device = spec, host, device
        self.data: LoadedData | None = None
        self.model: LoadedModel | None = None

    def component(self, kind: str, name: str, params: dict[str, Any], error: type[Exception] = ValueError):
        try:
            cls = self.host.get(kind, name)
        except KeyError as exc:
            raise error(exc.args[0]) from None
        return cls(cls.Params.model_validate(params))

    def context(self) -> AttackContext:
        return AttackContext(
            data=self.data, load_dataset=self.load_dataset, device=self.device, task=self.spec.task,
            num_classes=self.model.num_classes, load_model=self.load_model, apply_defense=self.apply_defense,
        )

    def defense(self, name: str, params: dict[str, Any], state: dict | None = None) -> tuple[Defense, LoadedModel]:
        """The audited model behind a defense, on the session's device (ValueError: bad config)."""
        defense = self.component("defense", name, params)
        defense.prepare(self.context())
        defended = defense.restore(self.model, self.data, state) if state is not None else defense.apply(self.model, self.data)
        for module in (defended.module, defended.adaptive_module, defended.screen, *defended.views.values()):
            if isinstance(module, torch.nn.Module):
                module.to(self.device)
        return defense, defended

    def apply_defense(self, name: str, params: dict[str, Any]) -> LoadedModel:
        return self.defense(name, params)[1]

    def load_model(self, loader: str, params: dict[str, Any]) -> LoadedModel:
        loaded = self.component("model", loader, params).load(self.spec.task)
        loaded.module.to(self.device)
        return loaded

    def load_dataset(self, name: str, params: dict[str, Any]) -> LoadedData:
        return self.component("dataset", name, params, DataError).load()


def _speed_switches(spec: Spec, device: torch.device, models: dict[str, LoadedModel]) -> dict[str, LoadedModel]:
    from medaudit.core.errors import EnvironmentProblem

    runtime = spec.runtime
    if runtime.autocast == "off" and not runtime.channels_last:
        return models
    if runtime.autocast == "fp16" and device.type != "cuda":
        raise EnvironmentProblem("runtime.autocast fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.autocast]

    def wrap(module):
        return prepare_for_audit(SpeedWrapper(module, dtype, runtime.channels_last))

    return {
        label: dataclasses.replace(
            loaded, module=wrap(loaded.module),
            adaptive_module=None if loaded.adaptive_module is None else wrap(loaded.adaptive_module),
            views={name: wrap(m) for name, m in loaded.views.items()},
        )
        for label, loaded in models.items()
    }


def _save_state(path: Path, state: dict) -> None:
    from medaudit.audits.rundir import atomic_file

    with atomic_file(path, "wb") as f:
        torch.save(state, f)


def _load_state(run_dir: Path | None, kind: str, label: str) -> dict | None:
    if run_dir is None or not (path := state_path(run_dir, kind, label)).is_file():
        return None
    return torch.load(path, weights_only=False)
