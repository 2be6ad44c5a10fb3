"""Triton kernels and their host launchers, one module per op (sources: the top-level `kernels/`).

Only triton and torch are imported by these modules: no nn / transformers / peft.
"""

from .._layout import source_folder

__path__ += source_folder("kernels")
