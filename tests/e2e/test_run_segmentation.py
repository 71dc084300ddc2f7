"""Segmentation audits end to end: dense attacks, records, worst case, report; 2D and 3D."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from medaudit.audits.records import read_records
from medaudit.audits.results import worst_case_records
from medaudit.core.components import Norm
from medaudit.core.spec import load_spec
from medaudit.audits.runner import Runner
from medaudit.core.perturbation import attacker_score
from medaudit.core.segmentation import case_mean, dice_per_class, foreground_mean
from tests.conftest import DEMO_UNET_2D, DEMO_UNET_3D
from tests.helpers import run_audit


def mean_dice(model, x, y) -> float:
    with torch.no_grad():
        return float(foreground_mean(dice_per_class(model(x).argmax(1), y, 5)).mean())


def test_dense_pgd_lowers_mean_dice_monotonically(host, seg_model, seg_data):
    pgd = host.get("attack", "pgd")(host.get("attack", "pgd").Params(steps=5))
    x, y = seg_data.images[:16], seg_data.masks[:16]
    dices = []
    for eps in (0, 2 / 255, 4 / 255, 8 / 255, 16 / 255):
        x_adv = pgd.perturb(seg_model.module, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(0))
        assert (x_adv - x).abs().max() <= eps + 1e-6
        dices.append(mean_dice(seg_model.module, x_adv, y))
    assert dices[0] > 0.9
    assert all(a > b for a, b in zip(dices, dices[1:])), dices
    assert dices[-1] < dices[0] - 0.2, dices


def test_pgd_keeps_the_lowest_dice_iterate(host, seg_model, seg_data):
    """More steps never weaken the attack: each case keeps its worst iterate."""
    x, y = seg_data.images[:8], seg_data.masks[:8]
    cls = host.get("attack", "pgd")
    few = cls(cls.Params(steps=2, step_size=1 / 255, random_start=False)).perturb(seg_model.module, x, y, eps=4 / 255, norm=Norm.LINF, generator=torch.Generator())
    more = cls(cls.Params(steps=6, step_size=1 / 255, random_start=False)).perturb(seg_model.module, x, y, eps=4 / 255, norm=Norm.LINF, generator=torch.Generator())
    with torch.no_grad():
        s_few = attacker_score(seg_model.module(few), y)
        s_more = attacker_score(seg_model.module(more), y)
    assert bool((s_more <= s_few + 1e-6).all())


SEG_SPEC = """\
audit: {{name: seg, title: "Segmentation <script>x</script>"}}
task: segmentation
model: {{loader: demo-unet, params: {model}}}
data: {{dataset: phantom, params: {data}}}
threat_model: {{norm: linf, epsilons: [0, 4/255, 16/255]}}
attacks:
  - name: fgsm
  - name: pgd
    params: {{steps: 3}}
  - name: pgd
    id: pgd-dice
    params: {{steps: 3, loss: dice}}
acceptance:
  criteria:
    - {{id: AC-01, metric: clean_dice, op: ">=", threshold: 0.8}}
    - {{id: AC-02, metric: robust_dice, attack: worst_case, epsilon: 4/255, op: ">=", threshold: 0.5}}
runtime: {{device: cpu, batch_size: 4, seed: 0, output_dir: {out}}}
"""


def run_spec(host, tmp_path, model: dict, data: dict):
    path = tmp_path / "seg.yaml"
    path.write_text(SEG_SPEC.format(model=json.dumps(model), data=json.dumps(data), out=tmp_path / "runs"), encoding="utf-8")
    return run_audit(load_spec(path, host), host)


@pytest.mark.slow
def test_segmentation_audit_2d(host, tmp_path, seg_model):
    outcome = run_spec(host, tmp_path, DEMO_UNET_2D, {"n": 8, "size": 64, "seed": 0})
    results = outcome.results
    assert outcome.exit_code == 0, results["acceptance"]
    rows = {(r["attack"], r["epsilon_label"]): r for r in results["rows"]}
    worst = rows[("worst_case", "16/255")]["metrics"]["robust_dice"]["value"]
    for attack in ("fgsm", "pgd", "pgd-dice"):
        assert worst <= rows[(attack, "16/255")]["metrics"]["robust_dice"]["value"] + 1e-12
    assert results["clean"]["none"]["clean_dice"]["interval"] == "bootstrap"
    assert [c["class"] for c in rows[("worst_case", "4/255")]["per_class"]] == ["background", "body", "lung", "bone", "nodule"]

    # Per case, the worst case is at most every single attack's Dice.
    jobs = {j["title"]: j["id"] for j in results["jobs"]}
    per_attack = [read_records(outcome.run_dir, jobs[f"none: {a} eps=16/255"]) for a in ("fgsm", "pgd", "pgd-dice")]
    merged = worst_case_records(per_attack)
    for worst_row, *rows_of_case in zip(merged, *per_attack):
        assert case_mean(worst_row["adv_dice"]) == min(case_mean(r["adv_dice"]) for r in rows_of_case)
    assert all(r["linf"] <= 16 / 255 + 1e-6 for recs in per_attack for r in recs)

    html = (outcome.run_dir / "report.html").read_text(encoding="utf-8")
    assert "Dice per class" in html and "data:image/png;base64," in html
    assert "<script>x</script>" not in html
    assert {f["id"] for f in results["figures"]} == {"robust-dice", "overlays"}


@pytest.mark.slow
def test_segmentation_audit_3d_with_sliding_window(host, tmp_path):
    """The 3D path: a MONAI 3D U-Net trained at 32 px, run patch-wise on 40 px volumes."""
    model = {**DEMO_UNET_3D, "patch_size": [16, 32, 32]}
    outcome = run_spec(host, tmp_path, model, {"n": 2, "size": 40, "depth": 16, "seed": 0})
    results = outcome.results
    assert results["data"]["image_shape"] == [1, 16, 40, 40]
    clean = results["clean"]["none"]["clean_dice"]["value"]
    worst = next(r for r in results["rows"] if r["attack"] == "worst_case" and r["epsilon_label"] == "16/255")
    assert worst["metrics"]["robust_dice"]["value"] < clean
    assert (outcome.run_dir / "figures" / "overlays.png").is_file()


def test_segmentation_spec_refuses_classification_only_parts(host, write_spec):
    from medaudit.core.errors import SpecError

    path = write_spec(
        task="task: segmentation",
        model="model:\n  loader: demo",
        attacks="attacks:\n  - name: deepfool",
        acceptance="",
    )
    with pytest.raises(SpecError) as err:
        load_spec(path, host)
    text = str(err.value)
    assert "model 'demo' does not support task 'segmentation'" in text
    assert "attack 'deepfool' does not support task 'segmentation'" in text


def test_3d_data_refuses_2d_only_attacks(host, tmp_path):
    from medaudit.core.errors import SpecError

    spec = textwrap.dedent(
        f"""\
        audit: {{name: v, title: v}}
        task: segmentation
        model: {{loader: demo-unet, params: {json.dumps(DEMO_UNET_3D)}}}
        data: {{dataset: phantom, params: {{n: 1, size: 32, depth: 16}}}}
        threat_model: {{norm: linf, epsilons: [0]}}
        attacks: [{{name: tifgsm}}]
        runtime: {{device: cpu, output_dir: {tmp_path / 'runs'}}}
        """
    )
    (tmp_path / "s.yaml").write_text(spec, encoding="utf-8")
    runner = Runner(load_spec(tmp_path / "s.yaml", host), host, show_progress=False)
    with pytest.raises(SpecError, match="attack 'tifgsm' does not handle 3D data"):
        runner.load()
    assert not (tmp_path / "runs").exists()
