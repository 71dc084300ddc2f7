"""The torch side of the ``onnx`` model loader: the module that runs an ONNX graph with
onnxruntime, and its backward pass that refuses. Apart from :mod:`.onnx` because these classes
need torch when they are defined, and registering the loader (reading a spec) must not import it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medaudit.core.errors import DataError, ModelLoadError
from medaudit.plugins.models.onnx import NO_GRADIENTS, _first_line, _shape_text, require_onnxruntime

#: Graph input element types the loader feeds, and their numpy types.
INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class _NoGradients(torch.autograd.Function):
    """Runs the graph; a backward pass through it is an error that says why."""

    @staticmethod
    def forward(ctx, x, graph):
        return graph.run(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{NO_GRADIENTS}: it cannot be differentiated; attack it with a score- or decision-based attack")


class OnnxGraph(nn.Module):
    """An ONNX graph run by onnxruntime, as a torch module: ``forward`` takes a float
    tensor on any device and returns the graph's output (float32) on that device. It has
    no parameters and gives no gradients."""

    def __init__(
        self, model: bytes, source: str, *, input_name: str | None = None, output_name: str | None = None,
        scores: str = "logits", threads: int = 0,
    ):
        super().__init__()
        self.source = source
        self.scores = scores
        self.threads = threads
        self._model = model  # kept to open further sessions (CUDA) and to survive copies
        self._sessions: dict[str, Any] = {}
        session = self.session("cpu")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if input_name is None:
            if len(inputs) != 1:
                raise ModelLoadError(
                    f"{source}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); name the "
                    "image input with the input param"
                )
            chosen = inputs[0]
        else:
            chosen = next((i for i in inputs if i.name == input_name), None)
            if chosen is None:
                raise ModelLoadError(f"{source}: the graph has no input {input_name!r} (it has {', '.join(i.name for i in inputs)})")
        if chosen.type not in INPUT_TYPES:
            raise ModelLoadError(f"{source}: input {chosen.name!r} takes {chosen.type}; the loader feeds float, float16 or double")
        if len(chosen.shape) not in (4, 5):
            raise ModelLoadError(
                f"{source}: input {chosen.name!r} has shape {_shape_text(chosen.shape)}; expected N x C x H x W or N x C x D x H x W"
            )
        out = outputs[0] if output_name is None else next((o for o in outputs if o.name == output_name), None)
        if out is None:
            raise ModelLoadError(f"{source}: the graph has no output {output_name!r} (it has {', '.join(o.name for o in outputs)})")
        self.input_name, self.input_shape, self.input_type = chosen.name, list(chosen.shape), INPUT_TYPES[chosen.type]
        self.output_name, self.output_shape = out.name, list(out.shape)
        #: The graph's fixed batch size, or None for a dynamic batch axis.
        self.batch = self.input_shape[0] if isinstance(self.input_shape[0], int) and self.input_shape[0] > 0 else None

    def __getstate__(self):  # sessions cannot be copied or pickled; they are reopened on use
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    def session(self, kind: str):
        """The onnxruntime session for ``kind`` ('cpu' or 'cuda'), opened on first use."""
        if kind not in self._sessions:
            ort = require_onnxruntime()
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: onnxruntime's warnings would flood the terminal
            if self.threads:
                options.intra_op_num_threads = self.threads
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if kind == "cuda" else ["CPUExecutionProvider"]
            try:
                self._sessions[kind] = ort.InferenceSession(self._model, sess_options=options, providers=providers)
            except Exception as exc:
                hint = ""
                if "external data" in str(exc).lower():
                    hint = ("; weights in external data files are not supported: save the model as one file, e.g. "
                            "onnx.save(onnx.load(path), out_path, save_as_external_data=False)")
                raise ModelLoadError(f"{self.source}: onnxruntime cannot load it as an ONNX model ({_first_line(exc)}){hint}") from None
        return self._sessions[kind]

    @staticmethod
    def cuda_available() -> bool:
        return "CUDAExecutionProvider" in require_onnxruntime().get_available_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _NoGradients.apply(x, self)
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's output for ``x`` (no autograd), on ``x``'s device."""
        expected = self.input_shape
        if x.dim() != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected[1:], x.shape[1:])):
            raise DataError(f"{self.source}: the ONNX graph takes input of shape {_shape_text(expected)}, got {list(x.shape)}")
        session = self.session("cuda" if x.device.type == "cuda" and self.cuda_available() else "cpu")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.input_type, copy=False)
        n = len(array)
        if n == 0:  # run one blank case for the output's shape
            array = np.zeros((1, *array.shape[1:]), dtype=self.input_type)
        step = self.batch or len(array)
        outputs = []
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            k = len(chunk)
            if k < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - k, axis=0)])
            try:
                out = session.run([self.output_name], {self.input_name: chunk})[0]
            except Exception as exc:
                raise DataError(
                    f"{self.source}: onnxruntime failed on input of shape {list(chunk.shape)} ({_first_line(exc)})"
                ) from None
            outputs.append(np.asarray(out)[:k])
        result = torch.from_numpy(np.ascontiguousarray(np.concatenate(outputs)[:n])).float()
        if self.scores == "probabilities":
            result = result.clamp_min(1e-30).log()
        return result.to(x.device)
