"""The report's clinical-shift pieces on hand-made results: the corruption table and heat map,
natural shift leaving the threats not assessed, and the summary's worst direction of error."""

from __future__ import annotations

from medaudit.audits.figures import corruption_heatmap
from medaudit.plugins.report.sections import NATURAL_SHIFT, Limitations, Shift, Summary, not_assessed
from medaudit.reports.html import make_environment


def value(v: float, n: int = 20) -> dict:
    k = round(v * n)
    return {"value": v, "n": n, "successes": k, "ci_low": max(v - 0.2, 0.0), "ci_high": min(v + 0.2, 1.0),
            "interval": "wilson"}


def rates(sens_normal: float, sens_nodule: float) -> dict:
    return {"classes": ["normal", "nodule"], "confusion": [[10, 10, 0], [10, 10, 0]], "rates": [
        {"class": "normal", "n": 20, "sensitivity": value(sens_normal), "specificity": value(sens_nodule)},
        {"class": "nodule", "n": 20, "sensitivity": value(sens_nodule), "specificity": value(sens_normal)}]}


def corruption_row(attack: str, level: float, accuracy: float) -> dict:
    return {"defense": "none", "attack": attack, "spec_attack": attack, "epsilon": level,
            "epsilon_label": f"severity {level:g}", "budget": "severity",
            "metrics": {"robust_accuracy": value(accuracy)}, "class_rates": rates(0.9, accuracy / 2),
            "corruption": {"strength": 0.1 * level, "draws_mean": value(min(accuracy + 0.1, 1.0))},
            "perceptibility": {"n": 20, "ssim_mean": 1 - 0.1 * level, "psnr_mean": 40 - 3 * level}}


def results(with_corruptions: bool = True) -> dict:
    rows = [{"defense": "none", "attack": "worst_case", "spec_attack": "worst_case", "epsilon": 1 / 255,
             "epsilon_label": "1/255", "metrics": {"robust_accuracy": value(0.4)}, "class_rates": rates(0.7, 0.1)}]
    if with_corruptions:
        rows += [corruption_row("ct-dose-noise", s, a) for s, a in ((1, 0.8), (3, 0.5))]
        rows += [corruption_row("contrast", s, a) for s, a in ((1, 0.9), (3, 0.2))]
    return {
        "metrics": [{"name": "clean_accuracy", "clean": True}, {"name": "robust_accuracy", "clean": False}],
        "clean": {"none": {"clean_accuracy": value(0.95)}}, "clean_class_rates": {"none": rates(0.95, 0.95)},
        "rows": rows, "attacks": [{"label": "pgd", "needs": "gradients"},
                                  {"label": "ct-dose-noise", "params": {"draws": 5}, "needs": "decisions"},
                                  {"label": "contrast", "params": {"draws": 1}, "needs": "decisions"}],
        "spec": {"acceptance": {"confidence": 0.95}}, "defenses": [], "validity": [], "data": {"n": 40},
        "threat_model": {"norm": "linf"}, "acceptance": {"criteria": [], "verdict": "PASS"}, "verdict": "PASS",
        "exit_code": 0,
    }


def environment():
    env = make_environment()
    env.globals["figures"] = []  # render_report lists the run directory's figures here
    return env


def test_the_shift_section_tabulates_each_corruption_and_severity():
    html = Shift().render(results(), environment())
    dose3 = html[html.index("<td>ct-dose-noise</td><td class=\"num\">3</td>"):].split("</tr>")[0]
    assert '<td class="num">5</td>' in dose3  # k draws
    assert "50.0% [30.0%, 70.0%]" in dose3  # worst of k
    assert "47.4%" in dose3  # drop vs clean: (0.95 - 0.5) / 0.95
    assert "0.7" in dose3 and "31" in dose3  # SSIM and PSNR
    assert "nodule: 25.0%" in dose3  # the class found least often
    assert Shift().render(results(with_corruptions=False), environment()).strip() == ""


def test_natural_shift_is_assessed_once_a_corruption_ran():
    assert NATURAL_SHIFT in {t for t, _ in not_assessed(results(with_corruptions=False))}
    assert NATURAL_SHIFT not in {t for t, _ in not_assessed(results())}
    assert "Natural and acquisition shift" not in Limitations().render(results(), make_environment())


def test_the_summary_names_the_class_the_worst_case_misses_most():
    html = Summary().render(results(), make_environment())
    assert "sensitivity for &#39;nodule&#39; falls from 95.0% clean to 10.0%" in html


def test_the_heat_map_is_drawn_only_when_a_corruption_ran(tmp_path):
    figure = corruption_heatmap(results()["rows"], "robust_accuracy", "Robust accuracy", tmp_path / "heat.png")
    assert figure["section"] == "shift" and (tmp_path / "heat.png").stat().st_size > 1000
    assert corruption_heatmap(results(False)["rows"], "robust_accuracy", "Robust accuracy", tmp_path / "x.png") is None
