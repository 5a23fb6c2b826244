"""The one loading policy for pretrained models, and the one device and dtype parser.

DESIGN §5: nothing downloads at run time unless the user asks. Every transformers model the
project loads (image backbones, text encoders, grounding detectors and VLMs) goes through
`load_pretrained`:

1. an explicit `model_path` that is a directory must hold a `config.json` (a `save_pretrained`
   directory) and is loaded with `local_files_only=True`;
2. an explicit `model_path` that is not a path but looks like a hub id (`org/name`) is looked up
   in the local Hugging Face cache only;
3. without a `model_path`, the registry's hub id is looked up in the local cache, and downloaded
   only with `allow_download=True` (and `HF_HUB_OFFLINE` unset).

A model that is not there raises the caller's not-found error at once, with the caller's message
(which says where it looked and how to provide the model). torch is imported lazily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Accepted dtype names (the torch name, its short form, or "torch.<name>").
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}

Missing = Callable[[str], Exception]  # problem description -> the error to raise


class ModelNotFoundError(FileNotFoundError):
    """A pretrained model is in none of the places looked at; the message says how to get it."""


def resolve_device(device: str | None) -> str:
    """None or "auto": cuda when this process sees a GPU, else cpu; anything else as given."""
    if device in (None, "", "auto"):
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: Any, device: str | None = None) -> Any:
    """The one dtype parser: None keeps the checkpoint's float32; "auto" is bf16 on a CUDA device
    and float32 elsewhere (CPU bf16 kernels are slow); names as in `_DTYPE_NAMES`; a torch.dtype
    passes through."""
    import torch
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return torch.bfloat16 if str(device or "").startswith("cuda") else None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPE_NAMES))} or a "
                         f"torch.dtype, got {dtype!r}")
    return getattr(torch, _DTYPE_NAMES[name])


def load_pretrained(loader: Callable[..., Any], model_path: str | None, hub_id: str | None,
                    missing: Missing, *, allow_download: bool = False, **kwargs: Any) -> Any:
    """`loader(source, local_files_only=..., **kwargs)` under the policy of the module docstring;
    `missing(problem)` builds the error raised when the model is not there."""
    if model_path is not None:
        path = Path(os.path.expanduser(str(model_path)))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise missing(f"directory {str(path)!r} has no config.json (not a save_pretrained "
                              "directory)")
            try:
                return loader(str(path), local_files_only=True, **kwargs)
            except OSError as err:
                raise missing(f"unreadable: {_first_line(err)}") from err
        if path.exists() or not _HUB_ID.match(str(model_path)):
            raise missing(f"no such directory {str(path.absolute())!r}")
        source, offline = str(model_path), True  # a hub id: the local cache only
    elif hub_id is not None:
        source, offline = hub_id, not allow_download
    else:
        raise ValueError("load_pretrained needs a model_path or a hub id")
    try:
        return loader(source, local_files_only=offline, **kwargs)
    except OSError as err:
        if offline:
            raise missing(f"not a local directory and not in the local Hugging Face cache "
                          f"({type(err).__name__})") from err
        raise missing(f"download failed: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
