"""Image decoders: codes or generation embeddings to pixels (unCLIP and the embedded decoder).

Importing this package (with diffusers installed) registers SeedImageDecoderPipeline and
SeedUnCLIPPipeline with diffusers, so `diffusers.DiffusionPipeline.from_pretrained(folder)` loads
the folders they save as it loads diffusers' own pipelines.
"""

import importlib.util as _util

if _util.find_spec("diffusers") is not None:
    from .image_decoder import SeedImageDecoderPipeline  # noqa: F401
    from .unclip import SeedUnCLIPPipeline  # noqa: F401
