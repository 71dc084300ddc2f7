"""Every registered attack keeps the contract of :class:`medaudit.core.components.Attack`
when run: the checks of :mod:`medaudit.testing` that vendors run on their own attacks.

Parametrized over the registry, so a new built-in attack is checked automatically; it only
needs an entry in CHEAP (small step or query counts keep the suite fast).
"""

from __future__ import annotations

import pytest

from medaudit.core.components import Norm
from medaudit.core.host import get_host
from medaudit.plugins.attacks.corruptions import CORRUPTIONS
from medaudit.testing import BUDGETS, attack_context, check_attack_run, check_budget_attack_run

#: Params that make each attack quick; every registered attack must be listed.
CHEAP = {
    "fgsm": {},
    "pgd": {"steps": 3},
    "bim": {"steps": 3},
    "mifgsm": {"steps": 3},
    "tifgsm": {"steps": 3},
    "apgd-ce": {"steps": 5},
    "apgd-t": {"steps": 5},
    "apgd-dlr": {"steps": 5},
    "fab": {"steps": 3},
    "fab-t": {"steps": 3},
    "square": {"queries": 20},
    "autoattack": {"apgd_steps": 5, "fab_steps": 3, "square_queries": 20},
    "deepfool": {"steps": 5},
    "cw": {"steps": 5, "search_steps": 1},
    "onepixel": {"population": 6, "generations": 2},
    "watermark": {"lengths": [16], "strengths": [0.2]},
    "uap": {"max_passes": 1, "fit_samples": 16},
    "art": {"attack": "FastGradientMethod"},
    "autoattack-seg": {"steps": 3, "queries": 10},
    "asma": {"steps": 3},
    "dag": {"steps": 3},
    "dag-medical": {"steps": 3},
    "msa": {"steps": 3},
}
#: The corruptions: one draw each (their own tests cover worst of k draws).
CHEAP.update({name: {} for name in CORRUPTIONS})
#: Segmentation-only attacks: the harness below runs the classification demo model, so
#: they are left out of it and checked against a U-Net in their own tests
#: (autoattack-seg: tests/plugins/attacks/test_autoattack_seg.py; asma, dag, dag-medical, msa:
#: tests/plugins/attacks/test_segmentation.py, whose prepare() rejects a classification context).
SEGMENTATION_ONLY = {"autoattack-seg", "asma", "dag", "dag-medical", "msa"}

HOST = get_host(load_entry_points=False)
CASES = [
    (name, norm)
    for name, cls in sorted(HOST.components["attack"].items())
    if name not in SEGMENTATION_ONLY
    for norm in sorted(cls.norms & set(BUDGETS), key=lambda n: n.value)
]
BUDGETED = sorted(name for name, cls in HOST.components["attack"].items() if cls.budget is not None)


def test_every_attack_has_cheap_params():
    assert set(HOST.components["attack"]) == set(CHEAP)


@pytest.mark.parametrize("name,norm", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_budget_range_identity_and_determinism(name, norm, demo_model, demo_data):
    x, y = demo_data.images[:8], demo_data.labels[:8]
    check_attack_run(HOST.get("attack", name), CHEAP[name], demo_model.module, x, y, norm=norm, eps=BUDGETS[norm],
                     context=attack_context(demo_data))


@pytest.mark.parametrize("name", BUDGETED)
def test_own_budget_measure_range_identity_and_determinism(name, demo_model, demo_data):
    """An attack sized by its own budget records, for every case, a measure within its
    level's limit (what the run's budget check reads), keeps shape, dtype and [0, 1], is
    the identity at level 0 and is deterministic under a seed."""
    cls = HOST.get("attack", name)
    model, x, y = demo_model.module, demo_data.images[:8], demo_data.labels[:8]
    if getattr(getattr(cls, "op", None), "modality", None) == "rgb":  # dermoscopy/pathology: RGB in, grey model
        x = x.expand(-1, 3, -1, -1).contiguous()
        model = lambda t, grey=model: grey(t.mean(1, keepdim=True))  # noqa: E731
    check_budget_attack_run(cls, CHEAP[name], model, x, y, context=attack_context(demo_data))


def test_the_run_check_catches_an_attack_over_its_budget(demo_model, demo_data):
    """The harness can fail: an attack that steps 2 eps is caught and named."""
    from medaudit.plugins.attacks.gradient import FGSM

    class Overshoot(FGSM):
        """FGSM that steps twice its budget."""

        name = "overshoot"

        def perturb(self, model, x, y, *, eps, norm, generator):
            return super().perturb(model, x, y, eps=2 * eps, norm=norm, generator=generator)

    x, y = demo_data.images[:8], demo_data.labels[:8]
    with pytest.raises(AssertionError, match="overshoot exceeds its linf budget"):
        check_attack_run(Overshoot, {}, demo_model.module, x, y, norm=Norm.LINF, eps=BUDGETS[Norm.LINF],
                         context=attack_context(demo_data))
