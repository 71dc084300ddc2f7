"""Model loaders: timm, segmentation-models-pytorch, your own factory or TorchScript, ONNX,
and the demo models trained on phantoms. ``_common`` holds the shared params and wrapping."""
