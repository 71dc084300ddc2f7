"""The Python API: run an audit from a notebook or a script, on a spec and optionally a
model and data held in memory, and get its results back as plain Python objects.

::

    import medaudit
    res = medaudit.audit("examples/demo.yaml")                    # what `medaudit run` does
    res = medaudit.audit(spec_dict, model=net, data=(images, labels))
    res.verdict, res.rows(), res.report_path

The run is the command line's: same engine, same run directory, same results.json, and it
is added to the audit history. Errors are :class:`medaudit.core.errors.MedauditError`
with the command line's one-line messages (``exc.exit_code`` says which kind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import yaml

from medaudit.core import memory
from medaudit.core.components import LoadedData, Task
from medaudit.core.errors import DataError, SpecError

#: What ``data=`` accepts, besides a :class:`LoadedData`.
DATA_FORMS = "(images, labels) or (images, masks) tensors or arrays, a torch Dataset of (image, target) pairs, or LoadedData"


@dataclasses.dataclass(frozen=True)
class Results:
    """A finished audit: its run directory and the content of its results.json.

    The tables are lists of dicts (no pandas needed; ``pandas.DataFrame(res.rows())``
    gives a frame)."""

    run_dir: Path
    data: dict[str, Any]

    @property
    def verdict(self) -> str:
        """PASS, FAIL, INCONCLUSIVE, INVALID or NO_DATA (see the README's exit codes)."""
        return self.data["verdict"]

    @property
    def exit_code(self) -> int:
        """The exit code ``medaudit run`` would give."""
        return self.data["exit_code"]

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def report_id(self) -> str | None:
        return self.data["audit"].get("report_id")

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.json"

    @property
    def report_path(self) -> Path | None:
        """report.html, or None when the spec's report.formats left it out."""
        path = self.run_dir / "report.html"
        return path if path.is_file() else None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (defense, attack, budget, view, metric) under attack: value, interval, n."""
        return [
            {"defense": row["defense"], "attack": row["attack"], "epsilon": row["epsilon"],
             "epsilon_label": row["epsilon_label"], "view": row.get("view"), "metric": name, **_flat(value)}
            for row in self.data["rows"] for name, value in row["metrics"].items()
        ]

    def clean(self) -> list[dict[str, Any]]:
        """One dict per (defense, clean metric)."""
        return [{"defense": defense, "metric": name, **_flat(value)}
                for defense, metrics in self.data["clean"].items() for name, value in metrics.items()]

    def criteria(self) -> list[dict[str, Any]]:
        """The acceptance criteria as judged: id, metric, threshold, estimate, verdict..."""
        return list(self.data["acceptance"]["criteria"])

    def validity(self) -> list[dict[str, Any]]:
        """The validity checks (Carlini et al. 2019): id, status, evidence."""
        return list(self.data["validity"])

    def to_json(self, **kwargs: Any) -> str:
        """results.json's content as text."""
        return json.dumps(self.data, **{"indent": 2, **kwargs})

    def __repr__(self) -> str:
        return f"Results({self.data['audit']['name']!r}, verdict={self.verdict}, run_dir={str(self.run_dir)!r})"

    def _repr_html_(self) -> str:  # a notebook shows the verdict and the criteria
        import html

        lines = "".join(f"<tr><td>{html.escape(c['id'])}</td><td>{html.escape(c['metric'])}</td>"
                        f"<td>{html.escape(str(c.get('estimate')))}</td><td><b>{c['verdict']}</b></td></tr>"
                        for c in self.criteria())
        return (f"<p><b>{html.escape(self.data['audit']['name'])}</b>: verdict <b>{self.verdict}</b> "
                f"({html.escape(str(self.run_dir))})</p><table><tr><th>criterion</th><th>metric</th><th>estimate</th>"
                f"<th>verdict</th></tr>{lines}</table>")

    @classmethod
    def open(cls, run_dir: str | Path) -> "Results":
        """The results of a finished run directory."""
        run_dir = Path(run_dir)
        return cls(run_dir, json.loads((run_dir / "results.json").read_text(encoding="utf-8")))


def _flat(value: dict | None) -> dict[str, Any]:
    value = value or {}
    return {k: value.get(k) for k in ("value", "ci_low", "ci_high", "n")}


def audit(
    spec: Mapping[str, Any] | str | Path,
    *,
    model: torch.nn.Module | None = None,
    data: Any = None,
    run_dir: str | Path | None = None,
    force: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    host: Any = None,
) -> Results:
    """Run an audit and return its :class:`Results`.

    :param spec: a spec as a dict (paths in it relative to the working folder), a YAML file's
        path, or YAML text.
    :param model: a ``torch.nn.Module`` mapping pixel-space input in [0, 1] to logits (or
        normalising inside with the spec's ``model: {params: {mean, std}}``); replaces the
        spec's ``model`` loader. Audited as a copy: the module you pass is left as it was.
    :param data: the evaluation cases (see :data:`DATA_FORMS`), float images in [0, 1]; replaces
        the spec's ``data``.
    :param run_dir: write the run exactly here (refused if it holds files, unless ``force``);
        default: a new ``<output_dir>/<audit>/<stamp>`` folder, as on the command line.
    :param num_classes: the model's classes; default: read from its output on the first case.
    :param class_names: names of the label values of ``data`` (default "0", "1", ...).
    :param progress: show progress bars (on stderr).
    """
    from medaudit.audits import history
    from medaudit.audits.plan import check_model_access
    from medaudit.audits.runner import Runner
    from medaudit.core.host import get_host
    from medaudit.core.spec import load_spec_text
    from medaudit.reports.write import check_reports_possible, write_reports

    host = host or get_host()
    source, base_dir, name = _spec_source(spec)
    task = Task(source.get("task", Task.CLASSIFICATION.value))
    with _kept() as keep:
        if data is not None:
            _replace(source, "data", "data=")
            loaded = as_loaded_data(data, task, class_names)
            source["data"] = {"dataset": "in-memory", "params": {"key": keep("data", loaded, loaded.fingerprint)}}
        if model is not None:
            params = _replace(source, "model", "model=")
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model= takes a torch.nn.Module, not {type(model).__name__}")
            from medaudit.core.models import state_dict_sha256

            probe = loaded if data is not None else _spec_data(source, host, base_dir)
            params.setdefault("in_channels", int(probe.image_shape[0]))
            params.setdefault("classes", num_classes or _classes_of(model, probe, task, params))
            params["key"] = keep("model", model, state_dict_sha256(model))
            source["model"] = {"loader": "in-memory", "params": params}
        if (model is not None or data is not None) and source.get("runtime", {}).get("executor") == "ray":
            raise SpecError(["runtime.executor: ray cannot reach a model or data passed in memory (they live in this "
                             "process); save them to files, or run with executor local"], source=name)
        resolved = load_spec_text(yaml.safe_dump(source, sort_keys=False), host, base_dir, name)
        check_model_access(resolved, host)
        check_reports_possible(resolved.report.formats)
        runner = Runner(resolved, host, show_progress=progress, command="medaudit.audit()")
        outcome = runner.run(run_dir=Path(run_dir) if run_dir is not None else None, force=force)
        write_reports(outcome.run_dir, outcome.results, host, resolved.report.formats, runner.data.sensitive_values,
                      runner.console,
                      history_index=history.index_path(resolved.runtime.output_dir, resolved.runtime.history))
    return Results(outcome.run_dir, outcome.results)


def _spec_source(spec: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], Path, str]:
    """The spec as a dict (a copy), the folder its relative paths start from, and its name."""
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(dict(spec), default=str)), Path.cwd(), "spec"
    if isinstance(spec, str) and "\n" in spec:
        text, base_dir, name = spec, Path.cwd(), "spec"
    else:
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError([f"cannot read the spec: {exc.strerror}"], source=str(path)) from None
        base_dir, name = path.resolve().parent, str(path)
    source = yaml.safe_load(text)
    if not isinstance(source, dict):
        raise SpecError(["a spec is a mapping (audit:, model:, data:, ...)"], source=name)
    return source, base_dir, name


def _replace(source: dict, section: str, argument: str) -> dict:
    """The params a spec section keeps when ``argument`` replaces its component: a model's
    normalisation may stay; naming a loader or dataset as well is ambiguous, and refused."""
    given = source.get(section) or {}
    named = {"model": "loader", "data": "dataset"}[section]
    if named in given:
        raise SpecError([f"{section}: names {named} {given[named]!r} and {argument} passes one too; give one of them"],
                        source="medaudit.audit()")
    return dict(given.get("params") or {})


@contextlib.contextmanager
def _kept() -> Iterator:
    keys: list[str] = []

    def keep(kind: str, obj: Any, fingerprint: str) -> str:
        keys.append(memory.keep(kind, obj, fingerprint))
        return keys[-1]

    try:
        yield keep
    finally:
        for key in keys:
            memory.release(key)


def _spec_data(source: dict, host: Any, base_dir: Path) -> LoadedData:
    """The spec's own data set, loaded to see what the in-memory model is given."""
    ref = source.get("data") or {}
    if "dataset" not in ref:
        raise SpecError(["data: missing; name a dataset or pass data="], source="medaudit.audit()")
    try:
        cls = host.get("dataset", ref["dataset"])
        params = cls.Params.model_validate(ref.get("params") or {}, context={"base_dir": base_dir})
    except (KeyError, ValueError) as exc:
        raise SpecError([f"data: {exc}"], source="medaudit.audit()") from None
    return cls(params).load()


def _classes_of(model: torch.nn.Module, data: LoadedData, task: Task, params: dict) -> int:
    """The model's output classes, from its output on the first case."""
    from medaudit.core.models import PixelSpaceModel

    x = data.cases[0]["image"].unsqueeze(0).float()
    net = PixelSpaceModel(model, params.get("mean", [0.0]), params.get("std", [1.0]), int(x.shape[1]))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = net(x.to(device))
    except Exception as exc:
        raise DataError(f"the model fails on the first case ({tuple(x.shape)}): {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if out.ndim < 2:
        raise DataError(f"the model gives outputs of shape {tuple(out.shape)}: expected N x classes logits")
    return int(out.shape[1])


def as_loaded_data(data: Any, task: Task = Task.CLASSIFICATION, class_names: Sequence[str] | None = None) -> LoadedData:
    """An evaluation set from what a notebook has at hand (see :data:`DATA_FORMS`),
    fingerprinted by its values."""
    if isinstance(data, LoadedData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, truth = (torch.as_tensor(v) for v in data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        images, truth = _stack(data)
    else:
        raise DataError(f"data= takes {DATA_FORMS}; got {type(data).__name__}")
    images = images.float()
    if images.ndim not in (4, 5):
        raise DataError(f"images must be N x C x H x W (or N x C x D x H x W); got shape {tuple(images.shape)}")
    if len(truth) != len(images):
        raise DataError(f"{len(images)} images but {len(truth)} labels")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1 or images.isnan().any():
        raise DataError(f"images must be in [0, 1] (pixel space; attack budgets are in that unit); got [{lo:.3g}, {hi:.3g}]"
                        " - scale them, and put any normalisation in the model (spec model.params mean/std)")
    truth = truth.long()
    digest = hashlib.sha256()
    for tensor in (images, truth):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    n_classes = int(truth.max()) + 1 if len(truth) else 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    digest.update(json.dumps(names).encode())
    common = dict(case_ids=[f"case-{i:05d}" for i in range(len(images))], fingerprint=digest.hexdigest(),
                  description=f"in-memory: {len(images)} cases of {tuple(images.shape[1:])}")
    if task is Task.SEGMENTATION:
        if truth.shape[1:] != images.shape[2:]:
            raise DataError(f"segmentation masks must be N x {' x '.join(map(str, images.shape[2:]))}; "
                            f"got {tuple(truth.shape)}")
        return LoadedData(images=images, labels=torch.zeros(len(images), dtype=torch.long), masks=truth,
                          class_names=[], mask_class_names=names, **common)
    if truth.ndim != 1:
        raise DataError(f"classification labels must be N class indices; got shape {tuple(truth.shape)}")
    return LoadedData(images=images, labels=truth, class_names=names, **common)


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets of a torch-style data set of (image, target) pairs or dicts."""
    images, truth = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Mapping):
            image, target = item["image"], item.get("mask", item.get("label"))
        else:
            image, target = item[0], item[1]
        images.append(torch.as_tensor(image))
        truth.append(torch.as_tensor(target))
    if not images:
        raise DataError("data= is empty: nothing to evaluate")
    return torch.stack(images), torch.stack(truth)
