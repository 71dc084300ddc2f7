"""Every registered attack keeps the contract of :class:`medaudit.core.components.Attack`.

Parametrized over the registry, so a new built-in attack is checked automatically; it only
needs an entry in CHEAP (small step or query counts keep the suite fast).
"""

from __future__ import annotations

import pytest
import torch

from medaudit.core.components import AttackContext, AttackOutcome, Norm
from medaudit.core.host import get_host
from medaudit.plugins.attacks.corruptions import CORRUPTIONS

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
BUDGETS = {Norm.LINF: 4 / 255, Norm.L2: 0.3}

HOST = get_host(load_entry_points=False)
CASES = [
    (name, norm)
    for name, cls in sorted(HOST.components["attack"].items())
    if name not in SEGMENTATION_ONLY
    for norm in sorted(cls.norms & set(BUDGETS), key=lambda n: n.value)
]


def test_every_attack_has_cheap_params():
    assert set(HOST.components["attack"]) == set(CHEAP)


def make(name, demo_data):
    cls = HOST.get("attack", name)
    attack = cls(cls.Params.model_validate(CHEAP[name]))
    attack.prepare(AttackContext(data=demo_data, load_dataset=lambda *a: demo_data, device=torch.device("cpu")))
    return attack


@pytest.mark.parametrize("name,norm", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_budget_range_identity_and_determinism(name, norm, demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images[:8], demo_data.labels[:8]
    eps = BUDGETS[norm]

    def run(attack, eps, seed=0):
        outcome = attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))
        return AttackOutcome.of(outcome).adversarial  # a bare tensor or an outcome with per-sample extras

    attack = make(name, demo_data)
    x_adv = run(attack, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all(), f"{name} exceeds its {norm.value} budget: {size.max():.6f} > {eps:.6f}"
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(run(make(name, demo_data), 0.0), x)
    assert torch.equal(run(make(name, demo_data), eps), x_adv), f"{name} is not deterministic under a fixed seed"
    assert not any(p.requires_grad for p in model.parameters())


BUDGETED = sorted(name for name, cls in HOST.components["attack"].items() if cls.budget is not None)


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

    def run(level, seed=0):
        outcome = AttackOutcome.of(make(name, demo_data).perturb(
            model, x, y, eps=level, norm=Norm.LINF, generator=torch.Generator().manual_seed(seed)))
        return outcome.adversarial, outcome.extras

    for level in cls.budget.levels:
        x_adv, extras = run(level)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        measured = extras[cls.budget.measure]
        assert len(measured) == len(x) and all(m <= cls.budget.limit(level) + 1e-9 for m in measured)
        assert torch.equal(run(level)[0], x_adv), f"{name} is not deterministic under a fixed seed"
    assert torch.equal(run(0.0)[0], x)
