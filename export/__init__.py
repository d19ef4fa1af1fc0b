"""Export a training checkpoint to the worker's ONNX contract (needs the `train` extra)."""
