"""Models: in-memory.

A ``torch.nn.Module`` handed to :func:`medaudit.audit` (``model=``): the API keeps it under
a key derived from its weights and names that key in the spec, so the run goes through
the same loader path as a file. Not usable from the command line or on Ray workers.
"""

from __future__ import annotations

import copy

from pydantic import Field

from medaudit import hookimpl
from medaudit.core import memory
from medaudit.core.components import LoadedModel, ModelLoader, Task
from medaudit.core.errors import ModelLoadError
from medaudit.core.models import state_dict_sha256
from medaudit.plugins.models._common import WrappedModelParams, finish


class InMemoryParams(WrappedModelParams):
    key: str = Field(description="The key medaudit.audit() kept the module under (set by the API, not by hand).")


class InMemoryLoader(ModelLoader):
    """A torch module passed to ``medaudit.audit(model=...)``; audited as a copy, so the caller's module is left as it was.

    The module maps pixel-space input in [0, 1] to logits, or normalises inside with
    ``mean``/``std``. Its fingerprint is the sha256 of its state dict.
    """

    name = "in-memory"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = InMemoryParams

    def load(self, task: Task) -> LoadedModel:
        p: InMemoryParams = self.params
        try:
            net = memory.get(p.key)
        except LookupError as exc:
            raise ModelLoadError(str(exc)) from None
        net = copy.deepcopy(net)  # the audit freezes and moves its model; the caller's stays as it was
        return finish(net, p, task, f"in-memory {type(net).__name__} (in_channels={p.in_channels}, classes={p.classes})",
                      fingerprint=state_dict_sha256(net))


@hookimpl
def register_models(register):
    register(InMemoryLoader)
