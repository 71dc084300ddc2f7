"""No host synchronisation inside an attack's step loop.

On a GPU every ``.item()``, ``bool(tensor)``, ``nonzero()``, boolean-mask index... makes the
host wait until the device has finished all queued work, so a sync per step serialises the
loop. The contract checked here: the number of syncs a ``perturb`` call makes does not grow
with its number of steps (queries), so syncs happen at most once per batch, restart or
target class. The segmentation attacks' documented early exit is the one exception: it
checks once every ``SYNC_EVERY`` steps whether every case is done, and that is counted
exactly.

On the CPU the syncs are counted through a ``TorchFunctionMode`` that sees every torch call
made from Python (:class:`HostSyncs`); what C++ does inside one op is invisible to it, so
ops known to sync on CUDA internally (``bincount``, ``unique``...) are counted by name. With
a CUDA device, the same contract is checked with ``torch.cuda.set_sync_debug_mode``, which
sees every real sync.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from medaudit.core.components import AttackContext, Norm, Task
from medaudit.core.host import get_host
from medaudit.plugins.attacks.corruptions import CORRUPTIONS
from medaudit.plugins.attacks.segmentation import SYNC_EVERY

Tensor = torch.Tensor

#: Calls that always wait for the device: they hand a value to Python, or their output's
#: shape depends on the data (``bincount`` reads the largest value on CUDA).
ALWAYS: dict[Callable, str] = {
    Tensor.item: "item()",
    Tensor.tolist: "tolist()",
    Tensor.cpu: "cpu()",
    Tensor.numpy: "numpy()",
    Tensor.__array__: "__array__()",
    Tensor.__bool__: "bool(tensor)",
    Tensor.__float__: "float(tensor)",
    Tensor.__int__: "int(tensor)",
    Tensor.__index__: "tensor as an index",
    Tensor.__complex__: "complex(tensor)",
    Tensor.__format__: "format(tensor)",
    Tensor.__repr__: "repr(tensor)",
    Tensor.nonzero: "nonzero()",
    torch.nonzero: "torch.nonzero",
    Tensor.argwhere: "argwhere()",
    torch.argwhere: "torch.argwhere",
    Tensor.masked_select: "masked_select()",
    torch.masked_select: "torch.masked_select",
    Tensor.unique: "unique()",
    torch.unique: "torch.unique",
    Tensor.unique_consecutive: "unique_consecutive()",
    torch.unique_consecutive: "torch.unique_consecutive",
    Tensor.bincount: "bincount()",
    torch.bincount: "torch.bincount",
    Tensor.equal: "equal()",
    torch.equal: "torch.equal",
    Tensor.allclose: "allclose()",
    torch.allclose: "torch.allclose",
    Tensor.is_nonzero: "is_nonzero()",
    torch.is_nonzero: "torch.is_nonzero",
}


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


def sync_name(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """What ``func(*args, **kwargs)`` is when it synchronises, else None."""
    name = ALWAYS.get(func)
    if name is not None:
        return name
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "torch.where(cond)"
    if func is Tensor.__getitem__ and _has_bool_index(args[1]):
        return "x[mask]"
    if func is Tensor.__setitem__ and _has_bool_index(args[1]) and isinstance(args[2], Tensor) and args[2].dim() > 0:
        return "x[mask] = tensor"  # a scalar value becomes masked_fill_, which does not sync
    if func is F.one_hot and (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1:
        return "one_hot without num_classes"
    if func in (torch.repeat_interleave, Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if (len(args) == 1 and not kwargs) or (isinstance(repeats, Tensor) and kwargs.get("output_size") is None):
            return "repeat_interleave without output_size"
    return None


_TORCH_DIR = str(Path(torch.__file__).parent)
_OPTIM_DIR = str(Path(torch.optim.__file__).parent)


def _site(frame) -> str:
    path = Path(frame.f_code.co_filename)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


def call_site(frame, depth: int = 3) -> str:
    """The innermost ``depth`` callers of ``frame`` outside torch, innermost first."""
    sites = []
    while frame is not None and len(sites) < depth:
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            sites.append(_site(frame))
        frame = frame.f_back
    return " <- ".join(sites) or "?"


class HostSyncs(TorchFunctionMode):
    """Records every host-synchronising torch call made while it is active, with its call site.

    Calls made by a ``torch.optim`` optimiser are left out: without ``capturable`` it keeps
    its step count on the host, so reading it (``.item()``) waits for nothing."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = sync_name(func, args, kwargs)
        if name is not None:
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(_OPTIM_DIR):
                self.calls.append((name, call_site(caller)))
        return func(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.calls)

    def report(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for call in self.calls:
            counts[call] = counts.get(call, 0) + 1
        return "\n".join(f"  {n} x {name} at {site}" for (name, site), n in sorted(counts.items(), key=lambda kv: kv[0][1]))


def test_the_harness_counts_syncs_and_nothing_else():
    t, mask = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    with HostSyncs() as syncs:
        t[0].item()
        bool(mask[0])
        if mask.any():
            pass
        float(t[1])
        t[mask]
        torch.where(mask)
        mask.nonzero()
        torch.bincount(torch.tensor([0, 2]), minlength=3)
        F.one_hot(torch.tensor([0, 1]))
        t.tolist()
    assert [name for name, _ in syncs.calls] == [
        "item()", "bool(tensor)", "bool(tensor)", "float(tensor)", "x[mask]", "torch.where(cond)", "nonzero()",
        "torch.bincount", "one_hot without num_classes", "tolist()",
    ]
    # Each call is located in this function, not in torch.
    assert all(f"{Path(__file__).name}:" in site.split(" <- ")[0] for _, site in syncs.calls), syncs.calls
    with HostSyncs() as syncs:
        u = torch.where(mask, t, 0.0) * 2 + t.flip(0)
        u[mask] = 0.0
        t.clone()[torch.tensor([0, 2])] = torch.tensor([5.0, 6.0])
        F.one_hot(torch.tensor([0, 1]), 3)
        u.sum(), u.argmax(), u.topk(2), len(u)
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.Adam([w])
        (w - t).pow(2).sum().backward()
        opt.step()  # reads its step count, a host tensor
    assert syncs.calls == []


# -- the attacks --------------------------------------------------------------------------

#: Registered attacks this file does not run, and why (each read from the attack's docstring).
EXEMPT = {
    "deepfool": "runs only the samples not fooled yet: one documented host sync per step to select them "
    "(each step costs a backward pass per candidate class, which dwarfs the sync)",
    "onepixel": "selects the samples not fooled yet once per generation (documented early stop)",
    "watermark": "one documented host sync per grid point, to select the samples not fooled yet (and exit once all are)",
    "art": "wraps the Adversarial Robustness Toolbox, which works on numpy arrays on the host",
    "jpeg": "a JPEG round trip through torchvision's codec, which encodes on the CPU",
}


@dataclass
class Case:
    """One attack run on the CPU at two step counts: ``params(steps)`` gives its params."""

    attack: str
    params: Callable[[int], dict]
    task: str = "classification"
    norm: Norm = Norm.LINF
    eps: float = 4 / 255
    steps: int = 3
    #: Steps per documented early-exit check (None: no such check).
    period: int | None = None

    def allowed_growth(self) -> int:
        """Syncs the run with ``2 * steps`` may make beyond the run with ``steps``."""
        if self.period is None:
            return 0
        return 2 * self.steps // self.period - self.steps // self.period


CASES = {
    "pgd": Case("pgd", lambda s: {"steps": s, "restarts": 2}),
    "pgd-l2": Case("pgd", lambda s: {"steps": s}, norm=Norm.L2, eps=0.5),
    "bim": Case("bim", lambda s: {"steps": s}),
    "mifgsm": Case("mifgsm", lambda s: {"steps": s}, norm=Norm.L2, eps=0.5),
    "tifgsm": Case("tifgsm", lambda s: {"steps": s}),
    "apgd-ce": Case("apgd-ce", lambda s: {"steps": s, "restarts": 2}, steps=5),
    "apgd-t": Case("apgd-t", lambda s: {"steps": s}, steps=5),
    "apgd-dlr": Case("apgd-dlr", lambda s: {"steps": s, "eot_samples": 2}, steps=5),
    "fab": Case("fab", lambda s: {"steps": s, "restarts": 2}),
    "fab-l2": Case("fab", lambda s: {"steps": s}, norm=Norm.L2, eps=0.5),
    "fab-t": Case("fab-t", lambda s: {"steps": s}),
    "square": Case("square", lambda s: {"queries": s, "early_exit": False}, steps=4),  # the early exit syncs
    "square-l2": Case("square", lambda s: {"queries": s, "early_exit": False}, norm=Norm.L2, eps=0.5, steps=4),
    "autoattack": Case("autoattack", lambda s: {"apgd_steps": s, "fab_steps": s, "square_queries": 3}, steps=5),
    "cw": Case("cw", lambda s: {"steps": s, "search_steps": 2}, norm=Norm.L2, eps=0.5),
    # uap's steps are its mini-batches: halving the batch doubles them; one documented sync per pass.
    "uap": Case("uap", lambda s: {"batch_size": 8 // s, "max_passes": 2, "target_fooling_rate": 1.0}, steps=2),
    "pgd-seg": Case("pgd", lambda s: {"steps": s}, task="segmentation"),
    "pgd-seg-dice": Case("pgd", lambda s: {"steps": s, "restarts": 2, "loss": "dice"}, task="segmentation"),
    "bim-seg": Case("bim", lambda s: {"steps": s}, task="segmentation"),
    "mifgsm-seg": Case("mifgsm", lambda s: {"steps": s}, task="segmentation"),
    "tifgsm-seg": Case("tifgsm", lambda s: {"steps": s}, task="segmentation"),
    "autoattack-seg": Case("autoattack-seg", lambda s: {"steps": s, "restarts": 2, "queries": s}, task="segmentation", steps=5),
    "asma": Case("asma", lambda s: {"steps": s}, task="segmentation", steps=SYNC_EVERY, period=SYNC_EVERY),
    "dag": Case("dag", lambda s: {"steps": s}, task="segmentation", steps=SYNC_EVERY, period=SYNC_EVERY),
    "dag-medical": Case("dag-medical", lambda s: {"steps": s}, task="segmentation", norm=Norm.L2, eps=0.5,
                        steps=SYNC_EVERY, period=SYNC_EVERY),
    "msa": Case("msa", lambda s: {"steps": s}, task="segmentation", steps=SYNC_EVERY, period=SYNC_EVERY),
}

#: Attacks without steps, run once: none needs a sync.
SINGLE_SHOT = {
    "fgsm": ("classification", {}),
    "fgsm-seg": ("segmentation", {"loss": "dice"}),
}
#: The corruptions (one draw, and five for a random one: the draws loop must not sync either).
SINGLE_SHOT.update({name: ("classification", {"draws": 5 if cls.op.random else 1})
                    for name, cls in CORRUPTIONS.items() if name not in EXEMPT})


@pytest.fixture(scope="module")
def problems(demo_model, demo_data, seg_model, seg_data):
    """Per task: the model, a few inputs, their labels and the data (for prepare)."""
    return {
        "classification": (demo_model.module, demo_data.images[:8], demo_data.labels[:8], demo_data, 2),
        "segmentation": (seg_model.module, seg_data.images[:3], seg_data.masks[:3], seg_data, 5),
    }


def make_attack(name: str, params: dict, task: str, data, num_classes: int, device="cpu"):
    cls = get_host(load_entry_points=False).get("attack", name)
    attack = cls(cls.Params.model_validate(params))
    task_ = Task.SEGMENTATION if task == "segmentation" else Task.CLASSIFICATION
    attack.prepare(AttackContext(data=data, load_dataset=lambda *a: data, device=torch.device(device), task=task_,
                                 num_classes=num_classes))
    return attack


def count_syncs(case: Case, steps: int, problems) -> HostSyncs:
    model, x, y, data, k = problems[case.task]
    attack = make_attack(case.attack, case.params(steps), case.task, data, k)
    generator = torch.Generator().manual_seed(0)
    with HostSyncs() as syncs:
        attack.perturb(model, x, y, eps=case.eps, norm=case.norm, generator=generator)
    return syncs


def test_every_registered_attack_is_checked_or_exempt():
    names = set(get_host(load_entry_points=False).components["attack"])
    checked = {c.attack for c in CASES.values()} | {n.removesuffix("-seg") for n in SINGLE_SHOT}
    assert names - checked - set(EXEMPT) == set(), "add the new attack to CASES (or EXEMPT, with the reason)"


@pytest.mark.parametrize("case_id", list(CASES))
def test_syncs_do_not_grow_with_the_steps(case_id, problems):
    case = CASES[case_id]
    short = count_syncs(case, case.steps, problems)
    long = count_syncs(case, 2 * case.steps, problems)
    assert len(long) - len(short) == case.allowed_growth(), (
        f"{case_id}: {len(short)} host syncs with {case.steps} steps, {len(long)} with {2 * case.steps} "
        f"(allowed growth {case.allowed_growth()}); with {2 * case.steps} steps:\n{long.report()}"
    )


@pytest.mark.parametrize("case_id", list(SINGLE_SHOT))
def test_single_shot_attacks_do_not_sync(case_id, problems):
    task, params = SINGLE_SHOT[case_id]
    model, x, y, data, k = problems[task]
    attack = make_attack(case_id.removesuffix("-seg"), params, task, data, k)
    eps = 4 / 255 if case_id not in CORRUPTIONS else 3.0
    if case_id in CORRUPTIONS and CORRUPTIONS[case_id].op.modality == "rgb":  # RGB in, the grey model behind
        x = x.expand(-1, 3, *x.shape[2:]).contiguous()
        model = lambda t, grey=model: grey(t.mean(1, keepdim=True))  # noqa: E731
    with HostSyncs() as syncs:
        attack.perturb(model, x, y, eps=eps, norm=Norm.LINF, generator=torch.Generator().manual_seed(0))
    assert len(syncs) == 0, syncs.report()


# -- on a GPU -----------------------------------------------------------------------------


def cuda_syncs(case: Case, steps: int, problems) -> int:
    """Syncs ``torch.cuda.set_sync_debug_mode`` reports while the attack runs on CUDA."""
    model, x, y, data, k = problems[case.task]
    model = copy.deepcopy(model).cuda()
    attack = make_attack(case.attack, case.params(steps), case.task, data, k, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x, y = x.cuda(), y.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            attack.perturb(model, x, y, eps=case.eps, norm=case.norm, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case_id", list(CASES))
def test_cuda_syncs_do_not_grow_with_the_steps(case_id, problems):
    case = CASES[case_id]
    cuda_syncs(case, case.steps, problems)  # warm up: lazy CUDA initialisation syncs once
    short = cuda_syncs(case, case.steps, problems)
    long = cuda_syncs(case, 2 * case.steps, problems)
    assert long - short == case.allowed_growth(), f"{case_id}: {short} syncs with {case.steps} steps, {long} with {2 * case.steps}"
