"""Where `seed_fast.kernels` and `seed_fast.export` find their modules.

The sources live in the repository's top-level `kernels/` and `export/` folders, which have no
`__init__.py`, so that running Python from a checkout's root never imports them as top-level
packages (Hugging Face ships a distribution called `kernels`). An installed wheel holds the
modules inside `seed_fast/kernels/` and `seed_fast/export/` (setup.py copies them there); in a
source checkout, and so in an editable install, the package's search path is extended to the
top-level folder instead.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_folder(name: str) -> "list[str]":
    """The checkout's top-level folder `name` as a search-path entry, or [] outside a checkout."""
    folder = ROOT / name
    is_checkout = (ROOT / "setup.py").is_file() and (ROOT / "csrc").is_dir()
    if is_checkout and folder.is_dir() and not (folder / "__init__.py").exists():
        return [str(folder)]
    return []
