"""Training configs for the tests: a base dict with overrides merged one level deep."""


def merged(base: dict, **kw) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}  # nested dicts copied
    for k, v in kw.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return data


def stage2_run(out, **kw) -> dict:
    """A 6-step stage II run on small synthetic data (checkpoints every 2 steps), with overrides."""
    return merged(
        {
            "stage": "stage2",
            "out": str(out),
            "steps": 6,
            "global_batch": 8,
            "ckpt_every": 2,
            "data": {"n": 64, "val_n": 16, "image_size": 64},
            "optim": {"lr": 1e-3, "warmup": 1},
            "llm": {"lora_dropout": 0.0, "eval_n": 8},
        },
        **kw,
    )
