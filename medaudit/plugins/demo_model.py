"""Built-in model loader ``demo``: a small timm classifier trained on ``phantom`` slices.

Nothing can be downloaded, so the example audit trains its own model on first use (about
ten seconds on two CPU cores) and caches the checkpoint under the user's cache folder,
keyed by the training config: later runs reuse the same file and fingerprint. The cache
folder is ``$MEDAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medaudit``, else
``~/.cache/medaudit``. Training uses phantom seeds disjoint from the evaluation data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from pydantic import Field

from medaudit import hookimpl
from medaudit.core.components import LoadedModel, ModelLoader, Params, Task
from medaudit.plugins.phantom import PhantomParams, make_phantoms
from medaudit.plugins.timm_models import TimmLoader, TimmParams, build_timm

log = logging.getLogger(__name__)

#: Bump when the training recipe changes, so stale cached checkpoints are not reused.
RECIPE_VERSION = 1
#: Training data seeds start here; evaluation specs use small seeds.
TRAIN_SEED_OFFSET = 1_000_000


class DemoParams(Params):
    arch: str = Field("test_resnet", description="timm architecture to train.")
    image_size: int = Field(64, ge=16, le=512, description="Size of the phantom slices it is trained on.")
    train_size: int = Field(640, ge=32, le=100_000, description="Number of training slices.")
    epochs: int = Field(10, ge=1, le=200)
    seed: int = Field(0, ge=0, description="Seed of the training data and the initialisation.")


def cache_dir() -> Path:
    if os.environ.get("MEDAUDIT_CACHE_DIR"):
        return Path(os.environ["MEDAUDIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medaudit"


def _timm_params(p: DemoParams, checkpoint: Path | None) -> TimmParams:
    return TimmParams.model_validate(
        dict(arch=p.arch, in_chans=1, num_classes=2, mean=[0.5], std=[0.25], checkpoint=checkpoint)
    )


def train_demo(p: DemoParams, path: Path) -> None:
    """Train on phantom slices and write the state dict atomically to ``path``."""
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
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("demo model: epoch %d/%d, loss %.3f", epoch + 1, p.epochs, loss.item())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(model.net.state_dict(), tmp)
    os.replace(tmp.name, path)


class DemoModel(ModelLoader):
    """A small timm classifier (nodule vs normal) trained on phantom slices on first use, then cached."""

    name = "demo"
    tasks = frozenset({Task.CLASSIFICATION})
    Params = DemoParams

    def checkpoint_path(self) -> Path:
        config = dict(self.params.model_dump(), recipe=RECIPE_VERSION)
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / f"demo-{self.params.arch}-{key}.pt"

    def load(self, task: Task) -> LoadedModel:
        path = self.checkpoint_path()
        if not path.is_file():
            log.warning("training the demo model once (cached at %s)", path)
            train_demo(self.params, path)
        loaded = TimmLoader(_timm_params(self.params, path)).load(task)
        loaded.description = f"demo: {loaded.description}, trained on {self.params.train_size} phantom slices"
        return loaded


@hookimpl
def register_models(register):
    register(DemoModel)
