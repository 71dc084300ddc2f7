"""Faults of the spec (issue 13, items 4, 5, 6, 15, 18): what validation must refuse, what
it must accept, and what every JSON output must be."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from medaudit.audits.rundir import json_text
from medaudit.core.spec import epsilon_label, load_spec, spec_json_schema
from medaudit.cli import cli
from medaudit.core.components import Norm
from medaudit.core.errors import ExitCode, SpecError

ROOT = Path(__file__).resolve().parents[2]


def errors_of(path, host) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, host)
    return info.value.problems


def line_of(path: Path, text: str, start: int = 0) -> int:
    lines = path.read_text().splitlines()
    return lines.index(text, start) + 1


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (browsers, jq, Go) do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def criterion(metric: str, op: str, threshold: str, epsilon: str | None = None) -> str:
    eps = f", epsilon: {epsilon}" if epsilon else ""
    return f"acceptance:\n  criteria:\n    - {{id: AC-01, metric: {metric}{eps}, op: '{op}', threshold: {threshold}}}"


# -- item 4: thresholds and epsilons that cannot mean anything; strict JSON -------------------


@pytest.mark.parametrize(
    "metric, op, threshold, expected",
    [
        ("clean_accuracy", ">=", ".nan", "finite number"),
        ("clean_accuracy", ">=", ".inf", "finite number"),
        ("clean_accuracy", ">=", "-2", "can never fail: clean_accuracy lies in [0, 1]"),
        ("clean_accuracy", ">=", "0", "can never fail: clean_accuracy lies in [0, 1]"),
        ("clean_accuracy", ">=", "5.0", "can never pass: clean_accuracy lies in [0, 1]"),
        ("clean_accuracy", ">", "1", "can never pass: clean_accuracy lies in [0, 1]"),
        ("clean_accuracy", "<=", "1", "can never fail: clean_accuracy lies in [0, 1]"),
        ("clean_accuracy", "<", "0", "can never pass: clean_accuracy lies in [0, 1]"),
        ("perturbation_l2_max", "<=", "-1", "can never pass: perturbation_l2_max lies in [0, inf)"),
    ],
)
def test_threshold_nan_or_outside_the_metric_range_is_refused(write_spec, host, metric, op, threshold, expected):
    epsilon = None if metric.startswith("clean") else "1/255"
    path = write_spec(acceptance=criterion(metric, op, threshold, epsilon))
    [problem] = errors_of(path, host)
    assert "acceptance.criteria[0].threshold" in problem and expected in problem, problem


@pytest.mark.parametrize(
    "metric, op, threshold",
    [("clean_accuracy", ">=", "1.0"), ("clean_accuracy", ">", "0"), ("attack_success_rate", "<=", "0"),
     ("perturbation_l2_max", "<=", "7.5")],
)
def test_thresholds_that_can_go_either_way_are_accepted(write_spec, host, metric, op, threshold):
    epsilon = None if metric.startswith("clean") else "1/255"
    spec = load_spec(write_spec(acceptance=criterion(metric, op, threshold, epsilon)), host)
    assert spec.acceptance.criteria[0].threshold == float(threshold)


@pytest.mark.parametrize("epsilons", ["[0, .nan]", "[0, 'nan']", "[0, -1/255]", "[0, .inf]"])
def test_nan_negative_or_infinite_epsilon_is_refused(write_spec, host, epsilons):
    path = write_spec(threat_model=f"threat_model:\n  norm: l2\n  epsilons: {epsilons}")
    [problem] = errors_of(path, host)
    assert "threat_model.epsilons[1]" in problem, problem


def test_json_outputs_are_strict_json():
    data = {"threshold": float("nan"), "values": [1.5, float("inf"), -float("inf")], "nested": {"x": float("nan")}}
    parsed = strict_loads(json_text(data))
    assert parsed == {"threshold": None, "values": [1.5, None, None], "nested": {"x": None}}


# -- item 5: duplicate keys -----------------------------------------------------------------


def test_duplicate_top_level_key_is_refused_with_both_lines(write_spec, host):
    second = "threat_model:\n  norm: linf\n  epsilons: [0, 8/255]"
    path = write_spec(runtime="runtime:\n  device: cpu\n" + second)
    first, dup = line_of(path, "threat_model:"), line_of(path, "threat_model:", line_of(path, "threat_model:"))
    problems = errors_of(path, host)
    assert problems == [f"{path}:{dup}: threat_model: duplicate key (first at line {first}); keep one"]


def test_duplicate_key_in_a_flow_mapping_is_refused(write_spec, host):
    path = write_spec(data="data:\n  dataset: phantom\n  params: {n: 32, size: 64,\n    n: 5000}")
    problems = errors_of(path, host)
    first, dup = line_of(path, "  params: {n: 32, size: 64,"), line_of(path, "    n: 5000}")
    assert problems == [f"{path}:{dup}: data.params.n: duplicate key (first at line {first}); keep one"]


# -- item 6: alias bombs ----------------------------------------------------------------------

BOMB = textwrap.dedent(
    """\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """
)

#: Reads a spec in a child process that may use at most 1 GiB of address space.
LIMITED_READ = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pathlib import Path
from medaudit.core.yamlsource import read_yaml
from medaudit.core.errors import SpecError
try:
    read_yaml(Path(sys.argv[1]))
except SpecError as exc:
    print(exc)
    sys.exit(4)
print("parsed")
"""


def test_alias_bomb_is_refused_naming_the_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB, encoding="utf-8")
    assert len(BOMB.encode()) < 400
    try:
        proc = subprocess.run([sys.executable, "-c", LIMITED_READ, str(path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a 400-byte alias bomb ran for a minute")
    assert proc.returncode == 4, proc.stdout + proc.stderr[-2000:]
    assert "100000" in proc.stdout and "aliases" in proc.stdout, proc.stdout


def test_recursive_alias_is_refused(tmp_path, host):
    path = tmp_path / "loop.yaml"
    path.write_text("audit: &x {name: loop, title: [*x]}\n", encoding="utf-8")
    [problem] = errors_of(path, host)
    assert problem.startswith(f"{path}:1:") and "an alias refers to the value that contains it" in problem


def test_small_anchors_and_merge_keys_still_work(write_spec, host):
    attacks = textwrap.dedent(
        """\
        attacks:
          - name: pgd
            id: pgd-short
            params: &pgd {steps: 5, restarts: 1}
          - name: pgd
            id: pgd-long
            params: {<<: *pgd, steps: 10}
          - name: pgd
            id: pgd-copy
            params: *pgd"""
    )
    spec = load_spec(write_spec(attacks=attacks), host)
    assert [a.params["steps"] for a in spec.attacks] == [5, 10, 5]


# -- item 15: validate checks what run checks before it loads anything ----------------------


def test_validate_and_run_refuse_missing_input_paths_with_their_lines(write_spec, tmp_path):
    data = "data:\n  dataset: image-csv\n  params:\n    images: no-images\n    labels_csv: no-labels.csv"
    out = tmp_path / "out"
    path = write_spec(data=data, runtime=f"runtime:\n  device: cpu\n  output_dir: {out}")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    images, labels = line_of(path, "    images: no-images"), line_of(path, "    labels_csv: no-labels.csv")
    assert f"{path}:{images}: data.params.images: not found: {tmp_path / 'no-images'}" in result.output
    assert f"{path}:{labels}: data.params.labels_csv: not found: {tmp_path / 'no-labels.csv'}" in result.output
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == ExitCode.USAGE_ERROR and "data.params.images: not found" in result.output
    assert not out.exists()


def test_validate_refuses_gradient_attacks_on_an_onnx_model(write_spec, tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "model.onnx").write_bytes(b"not loaded by validate")
    path = write_spec(model="model:\n  loader: onnx\n  params: {path: model.onnx}")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "attack 'pgd' needs gradients but the model gives decisions, scores" in result.output
    assert "no gradients" in result.output and "square" in result.output
    ok = write_spec(name="ok.yaml", model="model:\n  loader: onnx\n  params: {path: model.onnx}",
                    attacks="attacks:\n  - name: square\n    params: {queries: 10}")
    result = CliRunner().invoke(cli, ["validate", str(ok)])
    assert result.exit_code == 0, result.output


# -- item 18: the JSON Schema accepts every valid spec; budgets and labels follow the norm -------

SPECS = sorted((ROOT / "examples").glob("*.yaml")) + [
    ROOT / "examples" / "onnx-dicom" / "audit.yaml", ROOT / "medaudit" / "audits" / "starter.yaml",
]


@pytest.fixture(scope="module")
def schema_validator():
    from medaudit.core.host import get_host

    schema = spec_json_schema(get_host(load_entry_points=False))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_validates_against_the_json_schema(schema_validator, path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema_validator.iter_errors(data)]
    assert not errors, errors


def test_json_schema_rejects_unknown_keys_and_budgets_outside_the_norm(schema_validator):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text(encoding="utf-8"))
    assert schema_validator.is_valid(data)
    assert not schema_validator.is_valid({**data, "runtime": {**data.get("runtime", {}), "batchsize": 3}})
    assert not schema_validator.is_valid({**data, "threat_model": {"norm": "linf", "epsilons": [2.0]}})
    assert not schema_validator.is_valid({**data, "threat_model": {"epsilons": [2.0]}})
    assert not schema_validator.is_valid({**data, "threat_model": {"norm": "l2", "epsilons": [-1]}})
    assert schema_validator.is_valid({**data, "threat_model": {"norm": "l2", "epsilons": [0.5, 2.0, "3/2"]}})


def test_l2_budgets_above_one_are_valid_and_l_inf_ones_are_not(write_spec, host):
    spec = load_spec(write_spec(threat_model="threat_model:\n  norm: l2\n  epsilons: [0, 0.5, 2, 3/2]"), host)
    assert spec.threat_model.epsilons == [0.0, 0.5, 1.5, 2.0]
    [problem] = errors_of(write_spec(threat_model="threat_model:\n  epsilons: [0, 2]"), host)
    assert "threat_model.epsilons" in problem and "at most 1" in problem


def test_epsilon_labels_depend_on_the_norm():
    assert [epsilon_label(e, Norm.LINF) for e in (0, 1 / 255, 0.5 / 255, 8 / 255, 0.001)] == [
        "0", "1/255", "0.5/255", "8/255", "0.001"
    ]
    assert [epsilon_label(e, Norm.L2) for e in (0, 0.1, 0.5, 2.0, 25.5 / 255)] == ["0", "0.1", "0.5", "2", "0.1"]
    assert epsilon_label(0.01, Norm.L0) == "0.01"
