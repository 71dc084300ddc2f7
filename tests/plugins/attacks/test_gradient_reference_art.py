"""Our attacks against the reference implementations in ART, same settings, same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaudit.core.components import Norm
from medaudit.plugins.attacks.gradient import FGSM, PGD, PGDParams

art = pytest.importorskip("art", reason="adversarial-robustness-toolbox is a core dependency")
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

EPSILONS = [0.5 / 255, 1 / 255, 2 / 255]


@pytest.fixture(scope="module")
def setup(demo_model, demo_data):
    model, x, y = demo_model.module, demo_data.images, demo_data.labels
    clf = PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=2,
        clip_values=(0.0, 1.0), device_type="cpu",
    )
    return model, x, y, clf


def accuracy(model, x_adv, y) -> float:
    with torch.inference_mode():
        return (model(torch.as_tensor(x_adv)).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("eps", EPSILONS)
def test_fgsm_matches_art_fast_gradient_method(setup, eps):
    model, x, y, clf = setup
    ours = FGSM().perturb(model, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(0))
    theirs = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=len(x)).generate(x.numpy(), y=y.numpy())
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 0.02
    # same step: the perturbations agree almost everywhere (sign ties at zero gradient aside)
    assert np.mean(np.isclose(ours.numpy(), theirs, atol=1e-6)) > 0.99


@pytest.mark.parametrize("eps", EPSILONS)
def test_pgd_matches_art_projected_gradient_descent(setup, eps):
    model, x, y, clf = setup
    steps, step = 10, 2.5 * eps / 10
    ours = PGD(PGDParams(steps=steps, step_size=step)).perturb(
        model, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(0)
    )
    theirs = ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps, num_random_init=1, batch_size=len(x), verbose=False
    ).generate(x.numpy(), y=y.numpy())
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 0.02
