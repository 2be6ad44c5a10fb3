"""Triton kernels and their host launchers (installed as `seed_fast.kernels`).

Only triton and torch are imported here: no nn / transformers / peft.
"""
