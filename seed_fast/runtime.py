"""The torch-free onnxruntime runtime under its earlier name: it lives in `seed_fast.export.runtime`.

python -m seed_fast.runtime --model onnx/ image.png      # the same as `seed-fast ort-run`
"""

import sys

from .export.runtime import *  # noqa: F403
from .export.runtime import main

if __name__ == "__main__":
    sys.exit(main())
