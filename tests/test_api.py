"""The Python API (medaudit.audit) runs the command line's audit: same numbers from a spec
file, the same from a model and data held in memory, and plain Python results."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import medaudit
from medaudit.api import Results, as_loaded_data
from medaudit.cli import cli
from medaudit.core.components import Task
from medaudit.core.errors import DataError, ModelLoadError, SpecError
from medaudit.plugins.datasets.phantom import Phantom, PhantomParams
from tests.conftest import spec_text

SMALL = dict(
    data="data:\n  dataset: phantom\n  params: {n: 32, size: 64, seed: 0}",
    attacks="attacks:\n  - name: fgsm\n  - name: pgd\n    params: {steps: 3}",
    threat_model="threat_model:\n  norm: linf\n  epsilons: [0, 2/255]",
    validity="validity: {convergence_cases: 0, trace_cases: 0, noise_cases: 0}",
)


def values(results: Results) -> dict:
    return {(r["defense"], r["attack"], r["epsilon_label"], r["metric"]): r["value"] for r in results.rows()}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    spec = folder / "spec.yaml"
    spec.write_text(spec_text(**SMALL, runtime=f"runtime: {{device: cpu, batch_size: 32, output_dir: {folder / 'runs'}}}"))
    result = CliRunner().invoke(cli, ["run", str(spec), "--run-dir", str(folder / "run"), "-q"])
    assert result.exit_code == 0, result.output
    return spec, Results.open(folder / "run")


def test_api_on_a_spec_file_equals_the_cli_run(cli_run, tmp_path):
    spec, expected = cli_run
    got = medaudit.audit(spec, run_dir=tmp_path / "run")
    assert got.verdict == expected.verdict == "PASS" and got.exit_code == 0
    assert values(got) == values(expected) and got.clean() == expected.clean()
    assert got.data["fingerprints"] == expected.data["fingerprints"]
    assert got.report_path == tmp_path / "run" / "report.html" and got.report_path.is_file()
    assert json.loads(got.to_json()) == json.loads(got.results_path.read_text())
    assert got.report_id and got.report_id != expected.report_id  # another run, another id


def test_in_memory_model_and_data_give_the_loaders_numbers(cli_run, demo_model, tmp_path):
    """The demo model's module and the phantom tensors, passed in memory, audit exactly as
    the demo loader and the phantom dataset named in the spec."""
    spec, expected = cli_run
    source = yaml.safe_load(spec.read_text())
    del source["model"], source["data"]
    cases = Phantom(PhantomParams(n=32, size=64, seed=0)).load()
    module = demo_model.module
    before = [p.requires_grad for p in module.parameters()], module.training
    got = medaudit.audit(source, model=module, data=(cases.images, cases.labels), class_names=cases.class_names,
                         run_dir=tmp_path / "run")
    assert values(got) == values(expected)
    assert got.data["model"]["loader"] == "in-memory" and got.data["data"]["dataset"] == "in-memory"
    assert got.data["fingerprints"]["data_sha256"] == as_loaded_data((cases.images, cases.labels), Task.CLASSIFICATION,
                                                                     cases.class_names).fingerprint
    assert ([p.requires_grad for p in module.parameters()], module.training) == before  # audited a copy
    # The spec the run directory keeps names the in-memory objects; outside the API they do not exist.
    resolved = (tmp_path / "run" / "spec.resolved.yaml").read_text()
    assert "in-memory" in resolved
    from medaudit.core.host import get_host

    key = yaml.safe_load(resolved)["model"]["params"]["key"]
    with pytest.raises(ModelLoadError, match="exist only in the Python process"):
        get_host(load_entry_points=False).get("model", "in-memory")(
            get_host(load_entry_points=False).get("model", "in-memory").Params(key=key, classes=2)).load(Task.CLASSIFICATION)


def test_bad_inputs_are_refused_with_reasons(cli_run, demo_model, tmp_path):
    spec, _ = cli_run
    source = yaml.safe_load(spec.read_text())
    with pytest.raises(SpecError, match="names loader 'demo' and model= passes one too"):
        medaudit.audit(source, model=demo_model.module, run_dir=tmp_path / "a")
    del source["data"]
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        medaudit.audit(source, data=(torch.full((4, 1, 64, 64), 255.0), torch.zeros(4)), run_dir=tmp_path / "b")
    with pytest.raises(DataError, match="4 images but 3 labels"):
        medaudit.audit(source, data=(torch.zeros(4, 1, 64, 64), torch.zeros(3)), run_dir=tmp_path / "c")
    assert not any(tmp_path.iterdir())  # bad input leaves nothing behind


def test_a_torch_dataset_of_pairs_is_accepted():
    images, labels = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 1, 0, 2])
    pairs = [(images[i], labels[i]) for i in range(5)]
    from_pairs, from_tensors = as_loaded_data(pairs), as_loaded_data((images, labels))
    assert from_pairs.fingerprint == from_tensors.fingerprint and from_pairs.class_names == ["0", "1", "2"]
    assert as_loaded_data((images, labels + 0)).fingerprint == from_tensors.fingerprint
    assert as_loaded_data((images * 0.5, labels)).fingerprint != from_tensors.fingerprint
