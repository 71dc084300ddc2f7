"""Built-in model loader ``onnx``: an ONNX graph run by onnxruntime, audited as a black box.

A model often ships as an ONNX file rather than as Python code and weights. This loader
runs the file as it is, with onnxruntime, inside a torch module that attacks call like any
other model. No gradient flows through onnxruntime, so the model gives scores and
decisions only (``access``): the planner refuses gradient attacks and names the score- and
decision-based ones that fit the audit (``square``, ``onepixel``, ``watermark``...), and
the report leaves out the figures that need gradients (Grad-CAM).

Input: the graph's only input (or the one named by ``input``) takes float images
``N x C x H x W`` (or volumes ``N x C x D x H x W``). By default the graph is taken to
expect pixel-space input in [0, 1], normalisation included in the graph; when it expects
normalised input, set ``mean`` and ``std`` and they are applied in torch before the graph.
Grey images are replicated to the graph's channels. ``in_channels`` and ``classes`` are
read from the graph's input and output shapes where those are fixed; the params may state
them and must then agree. An output of probabilities (``scores: probabilities``) is turned
into log-probabilities, which the attacks use as logits (their softmax is the same).

Batches: a graph with a dynamic batch axis runs each batch in one call; one with a fixed
batch size ``B`` runs in chunks of ``B``, the last one padded by repeating its last case
(the padding's outputs are dropped).

Devices: onnxruntime runs on the CPU, or with its CUDA execution provider when that is
installed (the ``onnxruntime-gpu`` package) and the input is on a CUDA device; outputs come
back as float32 torch tensors on the input's device. The session uses as many threads as
torch (``runtime.num_threads``).

The file is read once: the bytes that are hashed (the fingerprint, and the ``sha256`` pin
when set) are the bytes onnxruntime loads. ONNX models that keep their weights in external
data files are not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from medaudit import hookimpl
from medaudit.core.components import Access, LoadedModel, ModelLoader, Task
from medaudit.core.errors import EnvironmentProblem, ModelLoadError
from medaudit.core.lazy import nn, torch
from medaudit.core.models import PinnedFileParams, prepare_for_audit, read_model_file
from medaudit.plugins.models._common import NormalisedModelParams, existing_file

#: Why an ONNX model gives no gradients (the planner's and the backward pass's message).
NO_GRADIENTS = "the model is an ONNX graph run by onnxruntime: no gradients"


def require_onnxruntime():
    """Import onnxruntime or say how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise EnvironmentProblem(
            f"the onnx model loader needs onnxruntime ({exc}); install it with: pip install 'medaudit[onnx]'"
        ) from None
    return onnxruntime


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


class OnnxParams(NormalisedModelParams, PinnedFileParams):
    pinned_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: Path = Field(description="The ONNX model file (.onnx), run by onnxruntime.")
    in_channels: int | None = Field(
        None, ge=1, le=64, description="Input channels of the graph; default: read from its input shape (grey images are replicated)."
    )
    classes: int | None = Field(
        None, ge=1, description="Classes of the output (segmentation: of the label map); default: read from its output shape."
    )
    input: str | None = Field(None, description="Name of the graph input that takes the image; default: its only input.")
    output: str | None = Field(None, description="Name of the graph output holding the class scores; default: its first output.")
    scores: Literal["logits", "probabilities"] = Field(
        "logits", description="What that output holds: logits, or probabilities (their logarithm is used as logits)."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _file(cls, value, info):
        return existing_file(value, info)

    @model_validator(mode="after")
    def _runtime_and_channels(self) -> "OnnxParams":
        try:
            require_onnxruntime()
        except EnvironmentProblem as exc:
            raise ValueError(str(exc)) from None
        if self.in_channels is not None:
            for field in ("mean", "std"):
                if len(getattr(self, field)) not in (1, self.in_channels):
                    raise ValueError(f"{field} needs 1 or in_channels={self.in_channels} values")
        return self


def _agree(stated: int | None, fixed, what: str, where: str, param: str) -> int:
    """The graph's fixed size of ``what`` or the stated one; they must agree when both exist."""
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    if stated is not None and fixed is not None and stated != fixed:
        raise ModelLoadError(f"{where}: the graph has {fixed} {what} but the params say {param}: {stated}")
    if stated is None and fixed is None:
        raise ModelLoadError(f"{where}: the graph does not fix its number of {what}; set {param}")
    return stated if stated is not None else fixed


class OnnxLoader(ModelLoader):
    """An ONNX graph run by onnxruntime: a black box that gives scores and decisions, no gradients.

    Score- and decision-based attacks only (e.g. square); see :mod:`medaudit.plugins.models.onnx`.
    """

    name = "onnx"
    tasks = frozenset({Task.CLASSIFICATION, Task.SEGMENTATION})
    dims = frozenset({2, 3})
    Params = OnnxParams
    access = frozenset({Access.SCORES, Access.DECISIONS})
    access_reason = NO_GRADIENTS

    def load(self, task: Task) -> LoadedModel:
        p: OnnxParams = self.params
        ort = require_onnxruntime()
        data, digest = read_model_file(p.path, p.sha256)
        from medaudit.core.model_wrappers import PixelSpaceModel
        from medaudit.plugins.models._onnx_graph import OnnxGraph

        graph = OnnxGraph(data, str(p.path), input_name=p.input, output_name=p.output, scores=p.scores,
                          threads=torch.get_num_threads())
        where = f"{p.path}: {graph.output_name!r}"
        in_channels = _agree(p.in_channels, graph.input_shape[1], "input channels", str(p.path), "in_channels")
        classes = _agree(p.classes, graph.output_shape[1] if len(graph.output_shape) > 1 else None, "classes", where, "classes")
        rank = len(graph.output_shape)
        if task is Task.CLASSIFICATION and rank != 2:
            raise ModelLoadError(f"{where} has shape {_shape_text(graph.output_shape)}; a classifier's output is N x classes")
        if task is Task.SEGMENTATION and rank != len(graph.input_shape):
            raise ModelLoadError(
                f"{where} has shape {_shape_text(graph.output_shape)}; a segmenter's output is N x classes x the input's spatial shape"
            )
        for field in ("mean", "std"):
            if len(getattr(p, field)) not in (1, in_channels):
                raise ModelLoadError(f"{p.path}: {field} needs 1 or {in_channels} values (the graph's input channels)")
        return LoadedModel(
            module=prepare_for_audit(PixelSpaceModel(graph, p.mean, p.std, in_channels)),
            task=task,
            num_classes=classes,
            in_channels=in_channels,
            access=self.access,
            fingerprint=digest,
            description=f"ONNX graph {p.path.name} run by onnxruntime {ort.__version__} (input {graph.input_name} "
            f"{_shape_text(graph.input_shape)}, {classes} classes; scores only, no gradients)",
            source={"onnx": str(p.path)},
            access_reason=self.access_reason,
        )


@hookimpl
def register_models(register):
    register(OnnxLoader)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export a pixel-space torch model to ``path`` as ONNX, with a dynamic batch axis,
    input ``image`` and output ``logits`` (as the examples and tests do; needs the ``onnx``
    and ``onnxscript`` packages: ``pip install 'medaudit[onnx]'``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["image"], output_names=["logits"], verbose=False,
        )
    program.save(str(path))
    return path
