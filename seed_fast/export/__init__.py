"""ONNX / TensorRT export of the SEED stack, and the torch-free runtime that runs it (sources: the
top-level `export/`).

    from seed_fast.default_model import DEFAULT_DIR
    from seed_fast.export import export_onnx
    export_onnx(["all"], "onnx/", checkpoint=DEFAULT_DIR)   # the embedded default model
    export_onnx(["tokenizer"], "onnx/", checkpoint="path/to/seed-tokenizer-2")

Then `seed_fast.export.runtime.SeedRuntime("onnx/")` runs it with numpy + onnxruntime only, and
`build_engines("onnx/", "trt/")` builds TensorRT engines from the files. The exporters are imported on
first use, so that `seed_fast.export.runtime` imports on a machine without torch.
"""

from .._layout import source_folder

__path__ += source_folder("export")

from .runtime import MANIFEST  # noqa: E402

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


def __getattr__(name: str):
    # local imports: torch is needed by the exporters, never by the runtime
    if name in ("TensorRTError", "build_engines"):
        from . import tensorrt_build

        return getattr(tensorrt_build, name)
    if name in __all__:
        from . import to_onnx

        return getattr(to_onnx, name)
    raise AttributeError(f"module 'seed_fast.export' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
