"""Training configs for the tests: a base dict with overrides merged one level deep."""


def merged(base: dict, **kw) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}  # nested dicts copied
    for k, v in kw.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return data
