"""A small 10-class problem on which medaudit's AutoAttack is checked against the reference's recorded numbers.

The reference implementation (fra31/auto-attack) is not on PyPI, so its results on this
problem are recorded once (``benchmarks/autoattack_reference.py --reference ... --write``)
in ``tests/data/autoattack_reference.json`` and compared against in CI. That only works if
the problem is rebuilt bit for bit: everything here is seeded, trained on one thread with
deterministic algorithms, and fingerprinted (:func:`problem_fingerprints`).

Ten classes, as the reference's APGD-T and FAB-T need (9 target classes), 16 x 16 grey
images so that the whole AutoAttack runs on a CPU in minutes: each class is a fixed smooth
random template, a case is its template with random contrast and brightness, a small
random shift and pixel noise, in [0, 1].
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medaudit.core.models import prepare_for_audit, state_dict_sha256

N_CLASSES, SIZE, N_EVAL, N_TRAIN = 10, 16, 200, 2000
EPOCHS, BATCH, LR = 12, 100, 3e-3


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """One thread, deterministic kernels and a private global RNG, restored on exit, so that
    training gives the same weights in every process and leaves the caller's state alone."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def _templates(generator: torch.Generator) -> torch.Tensor:
    """One smooth pattern per class (white noise blurred by a Gaussian of sigma 2 px),
    scaled to zero mean and unit peak (``N_CLASSES x 1 x SIZE x SIZE``)."""
    noise = torch.randn(N_CLASSES, 1, SIZE + 12, SIZE + 12, generator=generator)
    taps = torch.exp(-(torch.arange(13.0) - 6) ** 2 / (2 * 2.0**2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).view(1, 1, 13, 13)
    smooth = F.conv2d(noise, kernel)
    smooth = smooth - smooth.mean(dim=(2, 3), keepdim=True)
    return smooth / smooth.flatten(1).abs().amax(1).view(-1, 1, 1, 1)


def _cases(templates: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` cases, balanced over the classes: template x contrast + brightness, shifted by
    up to one pixel, plus Gaussian noise, clipped to [0, 1]."""
    y = torch.arange(n) % N_CLASSES
    y = y[torch.randperm(n, generator=generator)]
    contrast = 0.25 + 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.45 + 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    x = templates[y] * contrast + brightness
    shifts = torch.randint(-1, 2, (n, 2), generator=generator)
    x = torch.stack([xi.roll(tuple(s.tolist()), dims=(1, 2)) for xi, s in zip(x, shifts)])
    x = x + 0.08 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1), y


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; logits out (no softmax, as the reference expects)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (SIZE // 4) ** 2, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def ten_class_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model (eval mode, frozen), and the evaluation images (``200 x 1 x 16 x 16``
    in [0, 1]) with their labels; the training set is drawn separately. A few seconds on one
    CPU thread; the same weights and images for the same seed, in every process."""
    with _deterministic():
        generator = torch.Generator().manual_seed(seed)
        templates = _templates(generator)
        x_train, y_train = _cases(templates, N_TRAIN, generator)
        x_eval, y_eval = _cases(templates, N_EVAL, generator)
        torch.manual_seed(seed)
        model = SmallCNN()
        optimiser = torch.optim.Adam(model.parameters(), lr=LR)
        for _ in range(EPOCHS):
            order = torch.randperm(N_TRAIN, generator=generator)
            for start in range(0, N_TRAIN, BATCH):
                batch = order[start:start + BATCH]
                optimiser.zero_grad()
                F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimiser.step()
    return prepare_for_audit(model), x_eval, y_eval


def problem_fingerprints(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """sha256 of the weights and of the evaluation data: recorded numbers only apply to the
    problem they were measured on, so a test compares these before the numbers."""
    data = hashlib.sha256(x.contiguous().numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    return {"weights_sha256": state_dict_sha256(model), "data_sha256": data}


if __name__ == "__main__":  # python -m tests.reference_problem: timing, accuracy and fingerprints
    import time

    start = time.perf_counter()
    model, x, y = ten_class_problem()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"built in {seconds:.2f} s, clean accuracy {accuracy:.3f}, {problem_fingerprints(model, x, y)}")
