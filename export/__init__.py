"""ONNX / TensorRT export of the SEED stack (installed as `seed_fast.export`)."""
