"""Spec validation: every error at once, with file, line and field; nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medaudit.core.spec import epsilon_label, load_spec, parse_epsilon
from medaudit.cli import cli
from medaudit.core.components import Norm
from medaudit.core.errors import ExitCode, SpecError


def errors_of(path, host) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, host)
    return info.value.problems


def test_valid_spec_resolves_defaults_and_fractions(write_spec, host):
    spec = load_spec(write_spec(), host)
    assert spec.threat_model.epsilons == [0.0, 1 / 255, 4 / 255]
    pgd = next(a for a in spec.attacks if a.name == "pgd")
    assert pgd.params == {"steps": 5, "step_size": None, "random_start": True, "restarts": 1, "loss": "ce"}


@pytest.mark.parametrize("text,expected", [("1/255", 1 / 255), ("0.5/255", 0.5 / 255), (" 0.01 ", 0.01), (0.2, 0.2)])
def test_parse_epsilon(text, expected):
    assert parse_epsilon(text) == pytest.approx(expected)


def test_epsilon_label_reads_in_grey_levels():
    labels = [epsilon_label(e, Norm.LINF) for e in (0, 1 / 255, 0.5 / 255, 8 / 255, 0.001)]
    assert labels == ["0", "1/255", "0.5/255", "8/255", "0.001"]


def test_unknown_key_names_field_and_line(write_spec, host):
    path = write_spec(runtime="runtime:\n  device: cpu\n  batchsize: 32")
    [problem] = errors_of(path, host)
    line = path.read_text().splitlines().index("  batchsize: 32") + 1
    assert problem == f"{path}:{line}: runtime.batchsize: unknown key"


def test_unknown_attack_suggests_closest(write_spec, host):
    path = write_spec(attacks="attacks:\n  - name: pdg")
    [problem] = errors_of(path, host)
    assert "attacks[0].name: unknown attack 'pdg'; did you mean 'pgd'?" in problem
    assert f"{path}:" in problem


def test_epsilon_out_of_range(write_spec, host):
    path = write_spec(threat_model="threat_model:\n  epsilons: [0, 2]")
    [problem] = errors_of(path, host)
    assert "threat_model.epsilons" in problem and "2 is not at most 1: an L-inf budget" in problem


def test_missing_checkpoint_file(write_spec, host, tmp_path):
    model = "model:\n  loader: timm\n  params:\n    arch: test_resnet\n    checkpoint: weights/missing.pt"
    path = write_spec(model=model)
    [problem] = errors_of(path, host)
    line = path.read_text().splitlines().index("    checkpoint: weights/missing.pt") + 1
    assert problem.startswith(f"{path}:{line}: model.params.checkpoint: file not found: ")
    assert str(tmp_path / "weights" / "missing.pt") in problem  # resolved against the spec's folder


def test_wrong_type(write_spec, host):
    path = write_spec(attacks="attacks:\n  - name: pgd\n    params: {steps: many}")
    [problem] = errors_of(path, host)
    assert "attacks[0].params.steps" in problem and "valid integer" in problem


def test_all_errors_are_reported_at_once(write_spec, host):
    path = write_spec(
        attacks="attacks:\n  - name: pdg\n  - name: pgd\n    params: {steps: 0}",
        runtime="runtime:\n  device: gpu",
        threat_model="threat_model:\n  epsilons: [1/0]",
    )
    problems = errors_of(path, host)
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    for field in ("attacks[0].name", "attacks[1].params.steps", "runtime.device", "threat_model.epsilons[0]"):
        assert field in joined


def test_criterion_references_are_checked(write_spec, host):
    acceptance = (
        "acceptance:\n  criteria:\n"
        "    - {id: A, metric: robust_acuracy, epsilon: 1/255, op: '>=', threshold: 0.5}\n"
        "    - {id: B, metric: robust_accuracy, attack: cw, epsilon: 3/255, op: '>=', threshold: 0.5}\n"
        "    - {id: B, metric: robust_accuracy, op: '>=', threshold: 0.5}\n"
    )
    problems = "\n".join(errors_of(write_spec(acceptance=acceptance), host))
    assert "did you mean 'robust_accuracy'" in problems
    assert "unknown attack 'cw'" in problems
    assert "epsilon 3/255 is not in threat_model.epsilons (0, 1/255, 4/255)" in problems
    assert "needs an 'epsilon'" in problems
    assert "criterion id 'B' is used twice" in problems


def test_attack_must_support_the_threat_model_norm(write_spec, host):
    path = write_spec(threat_model="threat_model:\n  norm: l0\n  epsilons: [1/255]")
    problems = "\n".join(errors_of(path, host))
    assert "attack 'fgsm' does not bound the l0 norm" in problems


def test_invalid_yaml_and_oversized_files(write_spec, host, tmp_path):
    path = write_spec("audit: {name: x\n")
    [problem] = errors_of(path, host)
    assert "invalid YAML" in problem
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 1_100_000)
    assert "limited to" in errors_of(big, host)[0]


def test_cli_validate_and_run_write_nothing_on_bad_spec(write_spec, tmp_path):
    out = tmp_path / "out"
    path = write_spec(attacks="attacks:\n  - name: pdg", runtime=f"runtime:\n  output_dir: {out}\n  batchsize: 1")
    runner = CliRunner()
    result = runner.invoke(cli, ["validate", str(path)])
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert "2 errors" in result.output and "did you mean 'pgd'" in result.output and "runtime.batchsize" in result.output
    result = runner.invoke(cli, ["run", str(path)])
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert not out.exists()


def test_cli_validate_counts_jobs(write_spec):
    result = CliRunner().invoke(cli, ["validate", str(write_spec())])
    assert result.exit_code == 0
    assert "valid; 7 jobs planned" in result.output  # 1 clean + 2 attacks x 3 epsilons


def test_schema_includes_plugin_params():
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    text = json.dumps(schema)
    assert "PGDParams" in text and "restarts" in text and "PhantomParams" in text
    assert schema["title"] == "medaudit audit spec"


def test_init_writes_a_valid_starter_spec(tmp_path, host):
    target = tmp_path / "audit.yaml"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(target)]).exit_code == 0
    spec = load_spec(target, host)
    assert spec.audit.name == "my-audit" and [a.name for a in spec.attacks] == ["fgsm", "pgd"]
    again = runner.invoke(cli, ["init", str(target)])
    assert again.exit_code == ExitCode.USAGE_ERROR and "--force" in again.output


EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_specs_are_valid(path, host):
    spec = load_spec(path, host)
    assert yaml.safe_dump(spec.model_dump(mode="json"))  # the resolved spec serialises
    assert spec.acceptance.criteria


def test_examples_use_every_built_in_attack(host):
    """Except ``art`` (any ART attack by name) and the RGB corruptions: no example ships RGB
    images (dermoscopy/pathology sets are downloads), so their own tests cover them."""
    from medaudit.plugins.attacks.corruptions import CORRUPTIONS

    used = {a.name for path in EXAMPLES for a in load_spec(path, host).attacks}
    rgb = {name for name, cls in CORRUPTIONS.items() if cls.op.modality == "rgb"}
    assert set(host.components["attack"]) - used <= {"art"} | rgb

