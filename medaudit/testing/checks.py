"""The contract of each component kind, as plain functions that raise AssertionError.

Two layers. The class checks (:func:`check_class` and the ``check_<kind>_class`` functions)
read only class data: what the planner, spec validation and the report rely on without
instantiating anything. The run checks (:func:`check_attack`, :func:`check_metric`,
:func:`check_model_loader`, :func:`check_dataset`, :func:`check_defense`,
:func:`check_report_section`) build the component with the params given (keep them cheap)
and check what it returns.

No pytest here: the checks run from any test framework or a plain script, and every failure
names the component and the rule it breaks.
"""

from __future__ import annotations

import math
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from pydantic import ValidationError

from medaudit.core.components import (
    CROSS_ENTROPY, KINDS, MARGIN, Access, Attack, AttackContext, AttackFamily, AttackOutcome, Component, Dataset,
    Defense, Facet, LoadedData, LoadedModel, Metric, MetricValue, ModelLoader, Norm, Params, ReportSection, Task,
)

if TYPE_CHECKING:
    import torch

#: The budgets the run checks attack with, per norm (images in [0, 1]).
BUDGETS: dict[Norm, float] = {Norm.LINF: 4 / 255, Norm.L2: 0.3}
#: Slack for float rounding when comparing a perturbation with its budget.
TOLERANCE = 1e-5


def ensure(condition: Any, message: str) -> None:
    """``assert`` that survives ``python -O``: the checks are the product here, not a debug aid."""
    if not condition:
        raise AssertionError(message)


def kind_of(cls: type) -> str:
    """The kind (a key of :data:`~medaudit.core.components.KINDS`) whose base class ``cls`` extends."""
    for kind, (base, _) in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    bases = ", ".join(base.__name__ for base, _ in KINDS.values())
    raise AssertionError(f"{cls!r} extends none of the component base classes ({bases})")


def label(cls: type) -> str:
    return f"{kind_of(cls).replace('_', ' ')} {getattr(cls, 'name', cls.__name__)!r}"


# -- class checks ---------------------------------------------------------------------


def check_component(cls: type[Component]) -> None:
    """What every kind shares: a name, a one-line summary, the tasks and dimensionalities."""
    name = getattr(cls, "name", None)
    ensure(isinstance(name, str) and name.strip() == name and name,
           f"{cls.__name__}: 'name' must be a non-empty string")
    ensure(not getattr(cls, "__abstractmethods__", None),
           f"{label(cls)} leaves abstract methods unimplemented: {sorted(cls.__abstractmethods__)}")
    summary = cls.summary()
    ensure(summary and "\n" not in summary,
           f"{label(cls)}: no one-line summary (the class docstring's first paragraph)")
    ensure(isinstance(cls.tasks, frozenset) and cls.tasks and set(cls.tasks) <= set(Task),
           f"{label(cls)}: tasks must be a non-empty frozenset of Task")
    ensure(isinstance(cls.dims, frozenset) and cls.dims and set(cls.dims) <= {2, 3},
           f"{label(cls)}: dims must be a non-empty subset of {{2, 3}}")


def check_params(cls: type[Component]) -> None:
    """Params are closed (an unknown key is an error) and build with their defaults, or every
    required field has a description saying what to give."""
    params = cls.Params
    ensure(isinstance(params, type) and issubclass(params, Params),
           f"{label(cls)}: Params must subclass medaudit Params")
    ensure(params.model_config.get("extra") == "forbid", f"{label(cls)}: Params must forbid unknown keys")
    try:
        params.model_validate({"no_such_param_anywhere": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{label(cls)}: Params accepted an unknown key")
    try:
        params()
    except ValidationError:
        required = [f for f, info in params.model_fields.items() if info.is_required()]
        undocumented = [f for f in required if not params.model_fields[f].description]
        ensure(not undocumented, f"{label(cls)}: required params without a description: {undocumented}")


def check_module_names_component(cls: type[Component]) -> None:
    """The built-ins' convention: the first line of the module's docstring names every
    component it registers (``Gradient attacks: fgsm, pgd, ...``), so a reader finds them."""
    module_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    first_line = module_doc.splitlines()[0] if module_doc else ""
    ensure(cls.name in re.findall(r"[\w-]+", first_line),
           f"{cls.name}: the first line of {cls.__module__}'s docstring must name it: {first_line!r}")


def check_model_loader_class(cls: type[ModelLoader]) -> None:
    ensure(issubclass(cls, ModelLoader), f"{cls!r} is not a ModelLoader")
    access = cls.access
    ensure(access is None or (isinstance(access, frozenset) and access and all(isinstance(a, Access) for a in access)),
           f"{label(cls)}: access must be None (known once loaded) or a non-empty frozenset of Access")
    ensure(isinstance(cls.access_reason, str), f"{label(cls)}: access_reason must be a string")
    if access is not None and Access.GRADIENTS not in access:
        ensure(cls.access_reason.strip(), f"{label(cls)}: gives no gradients, so access_reason must say why")


def check_dataset_class(cls: type[Dataset]) -> None:
    ensure(issubclass(cls, Dataset), f"{cls!r} is not a Dataset")


def check_attack_class(cls: type[Attack]) -> None:
    """Norms or an own budget (exactly one), access, family, extras and loss kinds as data."""
    ensure(issubclass(cls, Attack), f"{cls!r} is not an Attack")
    name = cls.name
    ensure(isinstance(cls.norms, frozenset) and all(isinstance(n, Norm) for n in cls.norms),
           f"{name}: norms must be a frozenset of Norm")
    ensure(bool(cls.norms) != (cls.budget is not None), f"{name}: bounded by norms or by its own budget, exactly one")
    ensure(isinstance(cls.extra_names, tuple) and all(isinstance(e, str) for e in cls.extra_names),
           f"{name}: extra_names must be a tuple of strings")
    if cls.budget is not None:
        budget = cls.budget
        ensure(budget.name and budget.description.strip(), f"{name}: its budget needs a name and a description")
        ensure(budget.measure in cls.extra_names,
               f"{name}: the budget's measure {budget.measure!r} must be one of extra_names")
        ensure(budget.levels and list(budget.levels) == sorted(budget.levels) and min(budget.levels) > 0,
               f"{name}: budget levels must be positive and ascending")
    ensure(isinstance(cls.needs, Access), f"{name}: needs must be an Access")
    ensure(isinstance(cls.family, AttackFamily), f"{name}: family must be an AttackFamily")
    ensure(isinstance(cls.targeted, bool), f"{name}: targeted must be a bool")
    ensure(isinstance(cls.loss_kinds, frozenset) and cls.loss_kinds <= {CROSS_ENTROPY, MARGIN},
           f"{name}: loss_kinds must be a frozenset of CROSS_ENTROPY and MARGIN")
    ensure(isinstance(cls.effort_params, tuple), f"{name}: effort_params must be a tuple of param names")


def check_defense_class(cls: type[Defense]) -> None:
    """The views an attacker differentiates, each described for the report."""
    ensure(issubclass(cls, Defense), f"{cls!r} is not a Defense")
    name = cls.name
    views = cls.view_names()
    ensure(isinstance(views, dict) and "naive" not in views,
           f"{name}: 'naive' is implicit (the deployed module), not a view")
    for view, text in views.items():
        ensure(isinstance(view, str) and view and "@" not in view, f"{name}: bad view name {view!r}")
        ensure(isinstance(text, str) and text.strip(), f"{name}: view {view!r} needs a description for the report")
    ensure(set(cls.averaging_views) <= set(views), f"{name}: averaging_views must be declared views")
    ensure(isinstance(cls.certifies, bool), f"{name}: certifies must be a bool")


def check_metric_class(cls: type[Metric]) -> None:
    """Direction, bounds and the record facets the metric needs."""
    ensure(issubclass(cls, Metric), f"{cls!r} is not a Metric")
    name = cls.name
    ensure(cls.better in {"higher", "lower"}, f"{name}: better must be 'higher' or 'lower'")
    low, high = cls.bounds
    ensure(low < high and not math.isnan(low) and not math.isnan(high),
           f"{name}: bounds must be an interval (low < high)")
    ensure(isinstance(cls.needs, frozenset) and all(isinstance(f, Facet) for f in cls.needs),
           f"{name}: needs must be a frozenset of Facet")
    ensure(isinstance(cls.clean, bool) and isinstance(cls.scores_cases, bool) and isinstance(cls.monotone, bool),
           f"{name}: clean, scores_cases and monotone are bools")
    ensure(not (cls.monotone and cls.clean), f"{name}: a clean metric sees no attack, so it cannot be monotone")
    if cls.scores_cases:
        ensure(cls.score_cases is not Metric.score_cases, f"{name} says it scores cases but has no score_cases")
        ensure(Facet.CASE_SCORES in cls.needs, f"{name} scores cases, so it needs Facet.CASE_SCORES")


def check_report_section_class(cls: type[ReportSection]) -> None:
    """An order, a title, and (for the default render) a template the report finds."""
    import jinja2

    from medaudit.reports.html import make_environment

    ensure(issubclass(cls, ReportSection), f"{cls!r} is not a ReportSection")
    name = cls.name
    ensure(isinstance(cls.order, int) and isinstance(cls.title, str) and cls.title.strip(),
           f"{name}: needs an int order and a title")
    if cls.render is ReportSection.render:  # the default renders ``template``: it must be found
        try:
            make_environment([cls.template_dir] if cls.template_dir else []).get_template(cls.template)
        except jinja2.TemplateNotFound:
            raise AssertionError(f"{name}: template {cls.template!r} not found") from None


CLASS_CHECKS: dict[str, Callable[[type], None]] = {
    "model": check_model_loader_class,
    "dataset": check_dataset_class,
    "attack": check_attack_class,
    "defense": check_defense_class,
    "metric": check_metric_class,
    "report_section": check_report_section_class,
}


def check_class(cls: type[Component]) -> None:
    """Every class check that applies to ``cls``: shared shape, params and its kind's data."""
    check_component(cls)
    check_params(cls)
    CLASS_CHECKS[kind_of(cls)](cls)


def check_unique_section_orders(classes: Iterable[type[ReportSection]]) -> None:
    orders: dict[int, str] = {}
    for cls in classes:
        ensure(cls.order not in orders,
               f"report sections {orders.get(cls.order)!r} and {cls.name!r} share order {cls.order}")
        orders[cls.order] = cls.name


def build(cls: type[Component], params: Mapping[str, Any] | None = None) -> Component:
    """An instance with ``params`` validated by its Params (as a spec's would be)."""
    return cls(cls.Params.model_validate(dict(params or {})))


# -- run checks: attacks --------------------------------------------------------------


def attack_context(
    data: LoadedData, model: LoadedModel | None = None, device: "torch.device | None" = None,
) -> AttackContext:
    """What :meth:`Attack.prepare` gets in an audit of ``model`` on ``data`` (any dataset
    name loads ``data`` again)."""
    import torch

    task = model.task if model is not None else Task.CLASSIFICATION
    return AttackContext(data=data, load_dataset=lambda *_: data, device=device or torch.device("cpu"), task=task,
                         num_classes=model.num_classes if model is not None else 0)


def make_attack(cls: type[Attack], params: Mapping[str, Any] | None, context: AttackContext) -> Attack:
    attack = build(cls, params)
    attack.prepare(context)
    return attack


def _frozen(model: Any) -> bool:
    return not any(p.requires_grad for p in getattr(model, "parameters", lambda: [])())


def check_attack_run(
    cls: type[Attack], params: Mapping[str, Any] | None, model: Callable, x: "torch.Tensor", y: "torch.Tensor", *,
    norm: Norm, eps: float, context: AttackContext,
) -> None:
    """One norm-bounded attack run: the shape, dtype and [0, 1] range kept, the budget held,
    the identity at eps 0, the same result under the same seed, the model left frozen. Each
    run uses a fresh instance, as each process of a sharded run would."""
    import torch

    def run(eps: float, seed: int = 0) -> "torch.Tensor":
        outcome = make_attack(cls, params, context).perturb(model, x, y, eps=eps, norm=norm,
                                                            generator=torch.Generator(x.device).manual_seed(seed))
        return AttackOutcome.of(outcome).adversarial  # a bare tensor or an outcome with per-sample extras

    name = cls.name
    x_adv = run(eps)
    ensure(x_adv.shape == x.shape and x_adv.dtype == x.dtype,
           f"{name} changed the shape or dtype: {x_adv.shape} {x_adv.dtype}")
    ensure(not x_adv.requires_grad, f"{name} returned a tensor that requires grad (detach it)")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    ensure((size <= eps + TOLERANCE).all(), f"{name} exceeds its {norm.value} budget: {size.max():.6f} > {eps:.6f}")
    ensure(x_adv.min() >= 0 and x_adv.max() <= 1, f"{name} leaves [0, 1]: [{x_adv.min():.4f}, {x_adv.max():.4f}]")
    ensure(torch.equal(run(0.0), x), f"{name} changes the input at eps 0")
    ensure(torch.equal(run(eps), x_adv), f"{name} is not deterministic under a fixed seed")
    ensure(_frozen(model), f"{name} left the model's parameters requiring grad")


def check_budget_attack_run(
    cls: type[Attack], params: Mapping[str, Any] | None, model: Callable, x: "torch.Tensor", y: "torch.Tensor", *,
    context: AttackContext, levels: Sequence[float] | None = None,
) -> None:
    """An attack sized by its own :class:`~medaudit.core.components.Budget`: at every level it
    records, for every case, a measure within the level's limit (what the run's budget check
    reads), keeps shape, dtype and [0, 1], is deterministic under a seed and the identity at
    level 0."""
    import torch

    name, budget = cls.name, cls.budget
    ensure(budget is not None, f"{name} has no budget of its own: use check_attack_run")

    def run(level: float, seed: int = 0) -> AttackOutcome:
        return AttackOutcome.of(make_attack(cls, params, context).perturb(
            model, x, y, eps=level, norm=Norm.LINF, generator=torch.Generator(x.device).manual_seed(seed)))

    for level in levels if levels is not None else budget.levels:
        outcome = run(level)
        x_adv = outcome.adversarial
        ensure(x_adv.shape == x.shape and x_adv.dtype == x.dtype, f"{name} changed the shape or dtype at {level}")
        ensure(not x_adv.requires_grad, f"{name} returned a tensor that requires grad (detach it)")
        ensure(x_adv.min() >= 0 and x_adv.max() <= 1, f"{name} leaves [0, 1] at {budget.name} {level}")
        measured = outcome.extras.get(budget.measure)
        ensure(measured is not None and len(measured) == len(x), f"{name} must return {budget.measure!r}, one per case")
        limit = budget.limit(level)
        ensure(all(m <= limit + 1e-9 for m in measured),
               f"{name}: {budget.measure} above {limit} at {budget.name} {level}")
        ensure(torch.equal(run(level).adversarial, x_adv), f"{name} is not deterministic under a fixed seed")
    ensure(torch.equal(run(0.0).adversarial, x), f"{name} changes the input at level 0")


def check_attack(
    cls: type[Attack], params: Mapping[str, Any] | None = None, *, model: LoadedModel, data: LoadedData,
    cases: int = 8, budgets: Mapping[Norm, float] = BUDGETS,
) -> None:
    """The whole attack suite: the class checks, then a run on the first ``cases`` cases of
    ``data`` under each of its norms that ``budgets`` covers (or at each level of its own
    budget). ``params`` should make it quick (few steps or queries)."""
    check_class(cls)
    ensure(model.task in cls.tasks, f"{cls.name} does not support the model's task {model.task.value!r}")
    cost = cls(cls.Params.model_validate(dict(params or {}))).cost(model.num_classes)
    ensure(isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0,
           f"{cls.name}: cost() must be a positive, finite number of model passes per case, not {cost!r}")
    context = attack_context(data, model)
    _, x, y = next(data.batches(0, cases, cases, task=model.task))
    if cls.budget is not None:
        check_budget_attack_run(cls, params, model.module, x, y, context=context)
        return
    norms = sorted(cls.norms & set(budgets), key=lambda n: n.value)
    ensure(norms, f"{cls.name}: none of its norms {sorted(n.value for n in cls.norms)} has a budget to check")
    for norm in norms:
        check_attack_run(cls, params, model.module, x, y, norm=norm, eps=budgets[norm], context=context)


# -- run checks: the other kinds ------------------------------------------------------


def check_loaded_model(loaded: LoadedModel, who: str, x: "torch.Tensor") -> "torch.Tensor":
    """A model ready to audit: eval mode, frozen, logits of the right shape; returns them."""
    import torch

    ensure(isinstance(loaded, LoadedModel), f"{who} must return a LoadedModel, not {type(loaded).__name__}")
    module = loaded.module
    ensure(not module.training, f"{who}: the module must be in eval mode")
    ensure(_frozen(module), f"{who}: the module's parameters must be frozen (requires_grad False)")
    ensure(isinstance(loaded.access, frozenset) and loaded.access and all(isinstance(a, Access) for a in loaded.access),
           f"{who}: access must be a non-empty frozenset of Access")
    ensure(Access.GRADIENTS in loaded.access or loaded.access_reason.strip(),
           f"{who}: gives no gradients but no access_reason")
    ensure(isinstance(loaded.fingerprint, str) and loaded.fingerprint,
           f"{who}: fingerprint (sha256 of the weights) is empty")
    ensure(loaded.num_classes >= 2 and loaded.in_channels >= 1, f"{who}: num_classes >= 2 and in_channels >= 1")
    with torch.inference_mode():
        logits = module(x)
    spatial = tuple(x.shape[2:]) if loaded.task is Task.SEGMENTATION else ()
    expected = (len(x), loaded.num_classes, *spatial)
    ensure(tuple(logits.shape) == expected, f"{who}: logits of shape {tuple(logits.shape)}, expected {expected}")
    ensure(torch.isfinite(logits).all(), f"{who}: non-finite logits on inputs in [0, 1]")
    if Access.GRADIENTS in loaded.access:
        probe = x.clone().requires_grad_(True)
        with torch.enable_grad():
            module(probe).float().sum().backward()
        ensure(probe.grad is not None, f"{who} says it gives gradients but no input gradient flows")
    return logits


def check_model_loader(
    cls: type[ModelLoader], params: Mapping[str, Any] | None = None, *, task: Task | None = None,
    spatial: Sequence[int] = (64, 64),
) -> LoadedModel:
    """The loader's class checks, then :meth:`~ModelLoader.load` and one forward pass on a
    batch of two random images of size ``spatial`` in [0, 1]; returns the loaded model."""
    import torch

    check_class(cls)
    task = task or sorted(cls.tasks, key=lambda t: t.value)[0]
    loaded = build(cls, params).load(task)
    who = f"model loader {cls.name!r}"
    ensure(loaded.task is task, f"{who} loaded a {loaded.task} model when asked for {task}")
    if cls.access is not None:
        ensure(loaded.access == cls.access,
               f"{who}: the loaded access {set(loaded.access)} differs from its class data")
    x = torch.rand((2, loaded.in_channels, *spatial), generator=torch.Generator().manual_seed(0))
    check_loaded_model(loaded, who, x)
    return loaded


def check_dataset(
    cls: type[Dataset], params: Mapping[str, Any] | None = None, *, task: Task | None = None,
) -> LoadedData:
    """The dataset's class checks, then :meth:`~Dataset.load` and its first batch (the only way
    the audit reads the evaluation set); returns the loaded data."""
    import torch

    check_class(cls)
    task = task or sorted(cls.tasks, key=lambda t: t.value)[0]
    data = build(cls, params).load()
    who = f"dataset {cls.name!r}"
    ensure(isinstance(data, LoadedData), f"{who} must return a LoadedData, not {type(data).__name__}")
    n = len(data)
    ensure(n > 0, f"{who} loaded no cases")
    ensure(len(set(data.case_ids)) == n and all(isinstance(c, str) and c for c in data.case_ids),
           f"{who}: case_ids must be unique non-empty strings")
    ensure(data.labels is not None and len(data.labels) == n and data.labels.dtype == torch.int64,
           f"{who}: labels must be an int64 tensor with one label per case")
    ensure(data.fingerprint, f"{who}: fingerprint is empty (the run directory records it)")
    ensure(len(data.image_shape) - 1 in cls.dims,
           f"{who}: image_shape {data.image_shape} is not of its dims {set(cls.dims)}")
    if task is Task.CLASSIFICATION:
        ensure(data.class_names, f"{who}: classification needs class_names")
        ensure(int(data.labels.min()) >= 0 and int(data.labels.max()) < len(data.class_names),
               f"{who}: labels outside range(len(class_names))")
    else:
        ensure(data.mask_class_names, f"{who}: segmentation needs mask_class_names")
    _, x, truth = next(data.batches(0, 2, 2, task=task))
    ensure(x.dtype == torch.float32 and tuple(x.shape[1:]) == data.image_shape,
           f"{who}: batches give {x.dtype} {tuple(x.shape[1:])}, expected float32 {data.image_shape}")
    ensure(x.min() >= 0 and x.max() <= 1, f"{who}: images must be in [0, 1]")
    ensure(truth.dtype == torch.int64 and len(truth) == len(x),
           f"{who}: the truth of a batch must be int64, one per case")
    return data


def check_defense(
    cls: type[Defense], params: Mapping[str, Any] | None = None, *, model: LoadedModel, data: LoadedData,
    cases: int = 4,
) -> LoadedModel:
    """The defense's class checks, then prepare and apply on ``model`` and ``data``: the defended
    model is ready to audit and gives logits of the undefended one's shape, from the deployed
    module and from each declared view; its screen adds one value per case for each field.
    Returns the defended model."""
    import torch

    check_class(cls)
    defense = build(cls, params)
    defense.prepare(attack_context(data, model))
    defended = defense.apply(model, data)
    who = f"defense {cls.name!r}"
    _, x, _ = next(data.batches(0, cases, cases, task=model.task))
    logits = check_loaded_model(defended, who, x)
    with torch.inference_mode():
        plain = model.module(x)
    ensure(logits.shape == plain.shape,
           f"{who}: logits of shape {tuple(logits.shape)}, the model's are {tuple(plain.shape)}")
    for view in cls.view_names():
        try:
            module = defended.view(view)
        except KeyError:
            raise AssertionError(f"{who} declares view {view!r} but the defended model has no such module") from None
        with torch.inference_mode():
            shape = tuple(module(x).shape)
        ensure(shape == tuple(plain.shape), f"{who}: view {view!r} gives logits of shape {shape}")
    screen = defended.screen
    if screen is not None:
        examined = screen.examine(x)
        ensure(set(examined) == set(screen.fields),
               f"{who}: its screen returned {sorted(examined)}, declared {screen.fields}")
        ensure(all(len(v) == len(x) for v in examined.values()), f"{who}: its screen must give one value per case")
        if Facet.REJECTION in screen.facets:
            ensure("rejected" in screen.fields, f"{who}: a rejecting screen needs the field 'rejected'")
    return defended


def check_metric_value(cls: type[Metric], value: Any, records: Sequence[dict], where: str) -> None:
    name = cls.name
    if value is None:
        return
    ensure(isinstance(value, MetricValue),
           f"{name} returned {type(value).__name__} on {where}, not a MetricValue or None")
    low, high = cls.bounds
    ensure(math.isfinite(value.value) and low <= value.value <= high,
           f"{name} = {value.value} on {where}, outside its bounds [{low}, {high}]")
    ensure(isinstance(value.n, int) and 0 < value.n <= len(records),
           f"{name}: n = {value.n} on {where} of {len(records)} cases")
    if value.successes is not None:
        ensure(0 <= value.successes <= value.n, f"{name}: successes {value.successes} outside [0, n = {value.n}]")
    if value.per_case is not None:
        ensure(len(value.per_case) == value.n, f"{name}: per_case holds {len(value.per_case)} values for n = {value.n}")


def check_metric(
    cls: type[Metric], records: Sequence[dict] | None = None, params: Mapping[str, Any] | None = None,
) -> None:
    """The metric's class checks, then :meth:`~Metric.compute` on ``records`` (default:
    :func:`medaudit.testing.example_records`), on its first case and on its first half (a
    subgroup's records are such subsets): None or a :class:`MetricValue` within its bounds,
    the same value twice, the records left as they were, and a value the results' intervals
    take."""
    import copy

    from medaudit.audits.aggregation import compute_metric
    from medaudit.core.jobs import Records
    from medaudit.testing.tiny import example_records

    check_class(cls)
    records = records if records is not None else example_records()
    facets = getattr(records, "facets", frozenset())
    ensure(cls.needs <= facets,
           f"{cls.name} needs facets {sorted(f.value for f in cls.needs - facets)} the records lack")
    metric = build(cls, params)
    before = copy.deepcopy(list(records))
    groups = {"all records": records, "the first case": records[:1], "the first half": records[: len(records) // 2]}
    for where, group in groups.items():
        group = Records(group, facets)
        value = metric.compute(group)
        check_metric_value(cls, value, group, where)
        ensure(metric.compute(group) == value, f"{cls.name} gives another value on the same records ({where})")
        compute_metric(metric, group, 0.95)  # what results.json keeps, intervals included
    ensure(list(records) == before, f"{cls.name} changed the records it computed on")


def check_report_section(cls: type[ReportSection], results: dict | None = None) -> str | None:
    """The section's class checks and, given a ``results`` dict (a results.json), its render:
    a non-empty HTML fragment. Returns the fragment (None without results)."""
    from medaudit.reports.html import make_environment

    check_class(cls)
    if results is None:
        return None
    section = build(cls)
    html = section.render(results, make_environment([cls.template_dir] if cls.template_dir else []))
    ensure(isinstance(html, str) and html.strip(), f"report section {cls.name!r} rendered nothing")
    return html
