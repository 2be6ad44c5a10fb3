"""ONNX / TensorRT export of the SEED stack (installed as `seed_fast.export`).

    from seed_fast.export import export_onnx
    export_onnx(["all"], "onnx/")                      # the embedded default model
    export_onnx(["tokenizer"], "onnx/", checkpoint="path/to/seed-tokenizer-2")

Then `seed_fast.runtime.SeedRuntime("onnx/")` runs it with numpy + onnxruntime only, and
`build_engines("onnx/", "trt/")` builds TensorRT engines from the files.
"""

from .tensorrt_build import TensorRTError, build_engines
from .to_onnx import MANIFEST, PARTS, ExportError, PartReport, export_onnx, load_checkpoint

__all__ = ["MANIFEST", "PARTS", "ExportError", "PartReport", "TensorRTError", "build_engines", "export_onnx", "load_checkpoint"]
