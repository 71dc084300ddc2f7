"""The demo models are one model whichever process trains them first."""

from __future__ import annotations

import torch

from medaudit.plugins.models.demo import TRAINING_THREADS, DemoParams, train_demo

SMALL = {"image_size": 32, "train_size": 128, "epochs": 2, "seed": 0}


def test_the_demo_classifier_trains_the_same_whatever_thread_count_its_caller_uses(tmp_path):
    weights = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        train_demo(DemoParams(**SMALL), tmp_path / f"{threads}.pt")
        assert torch.get_num_threads() == threads  # given back
        weights[threads] = torch.load(tmp_path / f"{threads}.pt", weights_only=True)
    assert TRAINING_THREADS == 2
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
