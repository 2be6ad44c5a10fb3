"""Hugging Face Hub ids for seed_fast's models: `from_pretrained("org/name")` fetches (or finds in
the local cache) a repository through huggingface_hub, `push_to_hub` uploads a saved folder, and the
usual loading arguments (`revision`, `cache_dir`, `local_files_only`, `token`, `torch_dtype` /
`dtype`, `device_map`) mean what they mean in transformers. With `HF_HUB_OFFLINE=1` only the cache
is read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")


def resolve_folder(name_or_path: str | os.PathLike, what: str, **hub: Any) -> Path:
    # what: "tokenizer", "SeedLLM", ... as the messages name it
    """A local folder as is; otherwise a Hub repository id, downloaded (or found in the cache) with
    huggingface_hub.snapshot_download. Raises FileNotFoundError naming both readings when neither
    works."""
    unknown = set(hub) - set(HUB_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained of a {what} got unexpected arguments {sorted(unknown)}")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_like_id = text.count("/") <= 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not looks_like_id or path.exists():
        raise FileNotFoundError(f"no {what} folder at {path}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise FileNotFoundError(f"no {what} folder at {path} (and huggingface_hub is not installed)")
    try:
        return Path(snapshot_download(text, **{k: v for k, v in hub.items() if v is not None}))
    except HFValidationError:
        raise FileNotFoundError(f"no {what} folder at {path}") from None
    except Exception as e:  # not found, offline without a cached copy, no access, network
        raise FileNotFoundError(
            f"no {what} folder at {text!r}, and as a Hugging Face Hub repository id it could not be fetched "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def placement(torch_dtype=None, dtype=None, device_map=None, device=None, *, what: str):
    """(dtype, device) from transformers-style arguments: `torch_dtype` / `dtype` (a torch dtype or
    its name, "auto" = as saved), `device_map` ("auto" = the GPU when there is one, a device name or
    torch.device; a per-module dict is refused: these models live on one device) or `device`."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"{what}: torch_dtype and dtype disagree ({torch_dtype} vs {dtype}); give one")
    dt = dtype if dtype is not None else torch_dtype
    if isinstance(dt, str):
        if dt == "auto":
            dt = None
        else:
            dt = getattr(torch, dt.replace("torch.", ""), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"{what}: unknown dtype {torch_dtype if torch_dtype is not None else dtype!r}")
    if dt is not None and not isinstance(dt, torch.dtype):
        raise TypeError(f"{what}: dtype must be a torch.dtype or its name, got {type(dt).__name__}")
    if device_map is not None and device is not None:
        raise ValueError(f"{what}: give device_map or device, not both")
    dev = device if device is not None else device_map
    if isinstance(dev, dict):
        raise ValueError(
            f"{what}: a per-module device_map is not supported (the model runs on one device); "
            "give a device such as 'cuda' or 'auto'"
        )
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dt, (torch.device(dev) if dev is not None else None)


def push_folder(
    save, repo_id: str, *, private: bool | None = None, token=None, revision=None, commit_message=None
) -> str:
    """save(folder) writes the model into a temporary folder, which is uploaded to `repo_id` (created
    when missing). Returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=commit_message or "Upload with seed_fast",
        )
    return str(getattr(info, "commit_url", info))
