"""ONNX / TensorRT export of the SEED stack (sources: the top-level `export/`).

    from seed_fast.default_model import DEFAULT_DIR
    from seed_fast.export import export_onnx
    export_onnx(["all"], "onnx/", checkpoint=DEFAULT_DIR)   # the embedded default model
    export_onnx(["tokenizer"], "onnx/", checkpoint="path/to/seed-tokenizer-2")

Then `seed_fast.runtime.SeedRuntime("onnx/")` runs it with numpy + onnxruntime only, and
`build_engines("onnx/", "trt/")` builds TensorRT engines from the files.
"""

from .._layout import source_folder

__path__ += source_folder("export")

from .tensorrt_build import TensorRTError, build_engines  # noqa: E402
from .to_onnx import MANIFEST, PARTS, ExportError, PartReport, export_onnx, load_checkpoint  # noqa: E402

__all__ = [
    "MANIFEST",
    "PARTS",
    "ExportError",
    "PartReport",
    "TensorRTError",
    "build_engines",
    "export_onnx",
    "load_checkpoint",
]
