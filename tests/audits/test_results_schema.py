"""results.json against its JSON Schema (``medaudit schema --results``): the files real audits
of both tasks write validate, every key they hold is described, and broken files are refused."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from medaudit.audits.results_schema import results_json_schema
from medaudit.core.host import get_host
from medaudit.core.spec import load_spec
from tests.conftest import spec_text
from tests.helpers import run_audit

#: Small demo models, trained in seconds: the schema does not care how good they are.
SMALL_CLASSIFIER = {"image_size": 32, "train_size": 128, "epochs": 3, "seed": 0}
SMALL_UNET = {"dims": 2, "image_size": 32, "train_size": 32, "steps": 20, "seed": 0}

CLASSIFICATION_SPEC = {
    "model": f"model:\n  loader: demo\n  params: {json.dumps(SMALL_CLASSIFIER)}",
    "attacks": "attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 3}\n"
               "  - name: deepfool\n    params: {steps: 5}",
    "threat_model": "threat_model:\n  norm: linf\n  epsilons: [0, 2/255]",
    "data": "data:\n  dataset: phantom\n  params: {n: 32, size: 32, seed: 0}",
}

SEGMENTATION_SPEC = """\
audit: {{name: seg-schema, title: Segmentation schema}}
task: segmentation
model: {{loader: demo-unet, params: {model}}}
data: {{dataset: phantom, params: {{n: 4, size: 32, seed: 0}}}}
threat_model: {{norm: linf, epsilons: [0, 4/255]}}
attacks:
  - name: fgsm
acceptance:
  criteria:
    - {{id: AC-01, metric: clean_dice, op: ">=", threshold: 0.8}}
    - {{id: AC-02, metric: robust_dice, attack: worst_case, epsilon: 4/255, op: ">=", threshold: 0.5}}
runtime: {{device: cpu, batch_size: 4, seed: 0, output_dir: {out}}}
validity: {{convergence_cases: 4, trace_cases: 1, noise_cases: 4}}
"""


def audit_results(tmp_path, text: str) -> dict:
    """Run the audit of ``text`` and read back the results.json it wrote."""
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    host = get_host(load_entry_points=False)
    outcome = run_audit(load_spec(path, host), host)
    return json.loads((outcome.run_dir / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator():
    schema = results_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    """A classifier audited with a defense and a minimum-norm attack (curves)."""
    tmp = tmp_path_factory.mktemp("classification")
    acceptance = ("acceptance:\n  criteria:\n    - {id: AC-01, metric: clean_accuracy, op: '>=', threshold: 0.5}\n"
                  "    - {id: AC-02, metric: robust_accuracy, epsilon: 2/255, op: '>=', threshold: 0.99}")
    text = spec_text(**CLASSIFICATION_SPEC, acceptance=acceptance,
                     defenses="defenses:\n  - name: gaussian\n    params: {sigma: 0.5}",
                     runtime=f"runtime:\n  device: cpu\n  batch_size: 32\n  seed: 0\n  output_dir: {tmp / 'runs'}")
    return audit_results(tmp, text)


def undescribed_keys(schema: dict, node: dict, instance, path: str = "") -> list[str]:
    """Keys of ``instance`` in an object whose keys the schema lists but that it does not list
    (objects the schema leaves free-form, or types per key, are not looked into)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    for branch in node.get("anyOf", []):
        if instance is not None and branch.get("type") != "null":
            return undescribed_keys(schema, branch, instance, path)
    found = []
    if isinstance(instance, dict):
        extra = node.get("additionalProperties")
        for key, value in instance.items():
            if key in node.get("properties", {}):
                found += undescribed_keys(schema, node["properties"][key], value, f"{path}/{key}")
            elif isinstance(extra, dict) or extra is True:
                found += undescribed_keys(schema, extra, value, f"{path}/{key}") if extra is not True else []
            elif "properties" in node:
                found.append(f"{path}/{key}")
    elif isinstance(instance, list) and isinstance(node.get("items"), dict):
        for i, value in enumerate(instance):
            found += undescribed_keys(schema, node["items"], value, f"{path}/{i}")
    return found


def test_every_property_of_the_schema_has_a_description(validator):
    def undocumented(node, path=""):
        if isinstance(node, dict):
            for key, prop in node.get("properties", {}).items():
                if not prop.get("description", "").strip():
                    yield f"{path}/{key}"
            for key, value in node.items():
                if key != "allOf":  # the verdict -> exit code rules, not properties
                    yield from undocumented(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from undocumented(value, f"{path}/{i}")

    assert list(undocumented(validator.schema)) == []


def test_classification_results_validate(validator, classification):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(classification)]
    assert not errors, errors[:10]
    # What the audit exercised, so that the validation above covered it.
    assert classification["defenses"] and classification["curves"]
    assert len(classification["acceptance"]["criteria"]) == 2
    assert any("class_rates" in row for row in classification["rows"])


def test_segmentation_results_validate(validator, tmp_path):
    results = audit_results(tmp_path, SEGMENTATION_SPEC.format(model=json.dumps(SMALL_UNET), out=tmp_path / "runs"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(results)]
    assert not errors, errors[:10]
    assert results["audit"]["task"] == "segmentation"
    assert any("per_class" in row for row in results["rows"])
    assert undescribed_keys(validator.schema, validator.schema, results) == []


def test_every_key_of_a_real_results_file_is_described(validator, classification):
    """A key added to results.json needs its description here (the schema stays open to readers)."""
    assert undescribed_keys(validator.schema, validator.schema, classification) == []


def test_the_walker_finds_an_undescribed_key(validator, classification):
    results = copy.deepcopy(classification)
    results["audit"]["surprise"] = 1
    results["rows"][0]["metrics"]["robust_accuracy"]["also"] = 2
    assert undescribed_keys(validator.schema, validator.schema, results) == [
        "/audit/surprise", "/rows/0/metrics/robust_accuracy/also"]


def all_errors(errors) -> list:
    return [f for e in errors for f in [e, *all_errors(e.context)]]


BREAKAGES = {
    "no verdict": (lambda r: r.pop("verdict"), []),
    "unknown verdict": (lambda r: r.update(verdict="MAYBE"), ["verdict"]),
    "exit code of another verdict": (lambda r: r.update(verdict="PASS", exit_code=1), ["exit_code"]),
    "exit code no verdict gives": (lambda r: r.update(exit_code=3), ["exit_code"]),
    "newer layout": (lambda r: r.update(schema_version=r["schema_version"] + 1), ["schema_version"]),
    "short hash": (lambda r: r["fingerprints"].update(model_sha256="abc"), ["fingerprints", "model_sha256"]),
    "value as text": (lambda r: r["clean"]["none"]["clean_accuracy"].update(value="high"),
                      ["clean", "none", "clean_accuracy", "value"]),
    "interval without its name": (lambda r: r["clean"]["none"]["clean_accuracy"].pop("interval"),
                                  ["clean", "none", "clean_accuracy"]),
    "row without metrics": (lambda r: r["rows"][0].pop("metrics"), ["rows", 0]),
    "criterion verdict": (lambda r: r["acceptance"]["criteria"][0].update(verdict="OK"),
                          ["acceptance", "criteria", 0, "verdict"]),
    "negative count": (lambda r: r["data"].update(n=-1), ["data", "n"]),
    "unknown task": (lambda r: r["audit"].update(task="detection"), ["audit", "task"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_results_file_fails_where_it_is_broken(validator, classification, breakage):
    change, where = BREAKAGES[breakage]
    results = copy.deepcopy(classification)
    change(results)
    errors = list(validator.iter_errors(results))
    assert errors, f"{breakage}: accepted"
    found = all_errors(errors)  # with the reasons each branch of an anyOf gave
    assert any(list(e.absolute_path) == where for e in found), [(list(e.absolute_path), e.message) for e in found]
