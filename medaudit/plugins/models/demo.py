"""Models: demo, demo-unet.

``demo`` is a small timm classifier and ``demo-unet`` a small 2D or 3D U-Net, both
trained on phantom data (:mod:`medaudit.core.phantoms`).

Nothing can be downloaded, so the example audit trains its own model on first use (about
ten seconds on two CPU cores) and caches the checkpoint under the user's cache folder,
keyed by the training config: later runs reuse the same file and fingerprint. The cache
folder is ``$MEDAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medaudit``, else
``~/.cache/medaudit``. Training uses phantom seeds disjoint from the evaluation data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import LoadedModel, ModelLoader, Params, Task
from medaudit.core.cache import cache_dir, save_atomic
from medaudit.core.lazy import torch
from medaudit.core.phantoms import PhantomParams, make_phantoms
from medaudit.plugins.models.local import FactoryLoader, FactoryParams
from medaudit.plugins.models.smp import SmpLoader, SmpParams, build_smp
from medaudit.plugins.models.timm import TimmLoader, TimmParams, build_timm

log = logging.getLogger(__name__)

#: Bump when the training recipe changes, so stale cached checkpoints are not reused.
RECIPE_VERSION = 2  # 2: trained with TRAINING_THREADS CPU threads
#: Training data seeds start here; evaluation specs use small seeds.
TRAIN_SEED_OFFSET = 1_000_000


class DemoParams(Params):
    arch: str = Field("test_resnet", description="timm architecture to train.")
    image_size: int = Field(64, ge=16, le=512, description="Size of the phantom slices it is trained on.")
    train_size: int = Field(640, ge=32, le=100_000, description="Number of training slices.")
    epochs: int = Field(10, ge=1, le=200)
    seed: int = Field(0, ge=0, description="Seed of the training data and the initialisation.")
    noise_sigma: float = Field(
        0.0, ge=0, le=1, description="Gaussian noise (standard deviation, image in [0, 1]) added to every training "
        "image, unclamped: the base classifier randomized smoothing needs (Cohen et al. 2019). 0: none.")

    def training_config(self) -> dict:
        """What the trained weights depend on (the cache key); no noise keeps the key it always had."""
        return self.model_dump(exclude={"noise_sigma"} if self.noise_sigma == 0 else set())


def _timm_params(p: DemoParams, checkpoint: Path | None) -> TimmParams:
    return TimmParams.model_validate(
        dict(arch=p.arch, in_chans=1, num_classes=2, mean=[0.5], std=[0.25], checkpoint=checkpoint)
    )


def cached_checkpoint(prefix: str, config: dict) -> Path:
    """Cache path keyed by the training config and recipe version."""
    config = dict(config, recipe=RECIPE_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{prefix}-{key}.pt"


#: CPU threads the demo models train with, whatever the process uses: training is chaotic,
#: and float sums split over another number of threads give another model (the classifier's
#: weights differ by up to 15 between 1 and 2 threads), so a cached demo model would depend
#: on which process trained it first.
TRAINING_THREADS = 2


@contextlib.contextmanager
def training_threads():
    """Train with :data:`TRAINING_THREADS` CPU threads, and give the caller's count back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_demo(p: DemoParams, path: Path) -> None:
    """Train on phantom slices and write the state dict atomically to ``path``."""
    with training_threads():
        _train_demo(p, path)


def _train_demo(p: DemoParams, path: Path) -> None:
    torch.manual_seed(p.seed)
    model = build_timm(_timm_params(p, None))
    x, y, _ = make_phantoms(PhantomParams(n=p.train_size, size=p.image_size, seed=TRAIN_SEED_OFFSET + p.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=p.epochs * -(-p.train_size // 64))
    g = torch.Generator().manual_seed(p.seed)
    model.train()
    for epoch in range(p.epochs):
        order = torch.randperm(p.train_size, generator=g)
        for start in range(0, p.train_size, 64):
            idx = order[start : start + 64]
            batch = x[idx]
            if p.noise_sigma > 0:
                batch = batch + p.noise_sigma * torch.randn(batch.shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("demo model: epoch %d/%d, loss %.3f", epoch + 1, p.epochs, loss.item())
    save_atomic(model.net.state_dict(), path)


class DemoModel(ModelLoader):
    """A small timm classifier (nodule vs normal) trained on phantom slices on first use, then cached."""

    name = "demo"
    tasks = frozenset({Task.CLASSIFICATION})
    Params = DemoParams

    def checkpoint_path(self) -> Path:
        return cached_checkpoint(f"demo-{self.params.arch}", self.params.training_config())

    def load(self, task: Task) -> LoadedModel:
        path = self.checkpoint_path()
        if not path.is_file():
            log.warning("training the demo model once (cached at %s)", path)
            train_demo(self.params, path)
        loaded = TimmLoader(_timm_params(self.params, path)).load(task)
        loaded.description = f"demo: {loaded.description}, trained on {self.params.train_size} phantom slices"
        return loaded


# -- demo-unet ------------------------------------------------------------------------

#: The five phantom structures: background, body, lung, bone, nodule.
SEG_CLASSES = 5


class DemoUNetParams(Params):
    dims: Literal[2, 3] = Field(2, description="2: smp U-Net on slices; 3: MONAI 3D U-Net on volumes.")
    image_size: int = Field(64, ge=16, le=512, description="Height and width of the phantoms it is trained on.")
    depth: int = Field(16, ge=8, le=256, description="3D only: slices per training volume.")
    train_size: int = Field(512, ge=16, le=100_000, description="Number of training slices (volumes).")
    steps: int = Field(200, ge=1, le=100_000, description="Optimiser steps (batches of 16 slices or 2 volumes).")
    seed: int = Field(0, ge=0, description="Seed of the training data and the initialisation.")
    patch_size: list[int] | None = Field(
        None, description="Audit time: run the model patch-wise with this patch size on larger inputs (sliding window)."
    )

    def training_config(self) -> dict:
        """What the trained weights depend on (the cache key): not the audit-time patch size."""
        return self.model_dump(exclude={"patch_size"})


def _unet_2d_params(checkpoint: Path | None, patch_size: list[int] | None = None) -> SmpParams:
    return SmpParams.model_validate(
        dict(arch="Unet", encoder="tu-test_resnet", encoder_depth=4, decoder_channels=[32, 16, 8, 8],
             in_channels=1, classes=SEG_CLASSES, mean=[0.5], std=[0.25], checkpoint=checkpoint, patch_size=patch_size)
    )


#: The 3D demo network: ``monai.networks.nets.UNet(**UNET_3D)``.
UNET_3D = dict(spatial_dims=3, in_channels=1, out_channels=SEG_CLASSES, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)


def _unet_3d_params(checkpoint: Path | None, patch_size: list[int] | None = None) -> FactoryParams:
    return FactoryParams.model_validate(
        dict(factory="monai.networks.nets:UNet", in_channels=1, classes=SEG_CLASSES, mean=[0.5], std=[0.25],
             kwargs=UNET_3D, checkpoint=checkpoint, patch_size=patch_size)
    )


def train_demo_unet(p: DemoUNetParams, path: Path) -> None:
    """Train on phantom label maps (cross-entropy + soft Dice) and save the state dict."""
    with training_threads():
        _train_demo_unet(p, path)


def _train_demo_unet(p: DemoUNetParams, path: Path) -> None:
    from medaudit.core.segmentation import soft_dice_loss

    torch.manual_seed(p.seed)
    if p.dims == 2:
        net = build_smp(_unet_2d_params(None))
        phantoms = PhantomParams(n=p.train_size, size=p.image_size, seed=TRAIN_SEED_OFFSET + p.seed)
        batch = 16
    else:
        from monai.networks.nets import UNet

        net = UNet(**UNET_3D)
        phantoms = PhantomParams(n=p.train_size, size=p.image_size, depth=p.depth, seed=TRAIN_SEED_OFFSET + p.seed)
        batch = 2
    x, _, masks = make_phantoms(phantoms)
    x = (x - 0.5) / 0.25  # the normalisation PixelSpaceModel applies at audit time
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=p.steps)
    g = torch.Generator().manual_seed(p.seed)
    net.train()
    for step in range(p.steps):
        idx = torch.randint(0, p.train_size, (batch,), generator=g)
        logits = net(x[idx])
        loss = torch.nn.functional.cross_entropy(logits, masks[idx]) + soft_dice_loss(logits, masks[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log.info("demo-unet: step %d/%d, loss %.3f", step + 1, p.steps, loss.item())
    save_atomic(net.state_dict(), path)


class DemoUNet(ModelLoader):
    """A small U-Net (2D smp, or 3D MONAI) segmenting phantom structures, trained on first use, then cached."""

    name = "demo-unet"
    tasks = frozenset({Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = DemoUNetParams

    def checkpoint_path(self) -> Path:
        return cached_checkpoint(f"demo-unet{self.params.dims}d", self.params.training_config())

    def load(self, task: Task) -> LoadedModel:
        p: DemoUNetParams = self.params
        path = self.checkpoint_path()
        if not path.is_file():
            log.warning("training the demo U-Net once (cached at %s)", path)
            train_demo_unet(p, path)
        if p.dims == 2:
            loaded = SmpLoader(_unet_2d_params(path, p.patch_size)).load(task)
        else:
            loaded = FactoryLoader(_unet_3d_params(path, p.patch_size)).load(task)
        loaded.description = f"demo-unet: {loaded.description}, trained on {p.train_size} phantom {'slices' if p.dims == 2 else 'volumes'}"
        return loaded


@hookimpl
def register_models(register):
    register(DemoModel)
    register(DemoUNet)
