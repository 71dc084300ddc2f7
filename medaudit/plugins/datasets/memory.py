"""Datasets: in-memory.

Images and labels handed to :func:`medaudit.audit` (``data=``): the API builds the
evaluation set, keeps it under a key derived from its values and names that key in the
spec. Not usable from the command line or on Ray workers.
"""

from __future__ import annotations

from pydantic import Field

from medaudit import hookimpl
from medaudit.core import memory
from medaudit.core.components import Dataset, LoadedData, Params, Task
from medaudit.core.errors import DataError


class InMemoryDataParams(Params):
    key: str = Field(description="The key medaudit.audit() kept the data under (set by the API, not by hand).")


class InMemoryData(Dataset):
    """Tensors (or a torch Dataset) passed to ``medaudit.audit(data=...)``; fingerprinted by their values."""

    name = "in-memory"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = InMemoryDataParams

    def load(self) -> LoadedData:
        try:
            return memory.get(self.params.key)
        except LookupError as exc:
            raise DataError(str(exc)) from None


@hookimpl
def register_datasets(register):
    register(InMemoryData)
