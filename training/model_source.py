"""Where a model loads from, checked before any work: a path that is not a model folder, a folder whose weights
are truncated, or a hub id the hub cannot serve here ends in one line naming it and what to do, in well under a
second, instead of a tokenizer backend's message or a minute of hub retries (issue #21).

Also the cheap completeness test of weight files the checkpoint fallback uses: a safetensors file's header
states the byte ranges of its tensors, so a truncated file is found from its size without reading it; torch's
.bin files are zip archives, whose central directory sits at the end."""

from __future__ import annotations

import json
import os
import socket
import struct
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from schemas.errors import ModelError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def safetensors_problem(path: Path) -> str | None:
    """None when `path`'s size is what its header says; else what is wrong, in words."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated ({size} bytes; its header alone says {n + 8})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read as safetensors ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is {'truncated' if size < 8 + n + end else 'longer than its header says'} " \
               f"({size} bytes, its header says {8 + n + end})"
    return None


def weights_problem(folder: Path) -> str | None:
    """None when the folder's weight files (safetensors, torch .bin) look whole; else the first problem."""
    for p in sorted(folder.glob("*.safetensors")):
        why = safetensors_problem(p)
        if why:
            return why
    for p in sorted(folder.glob("*.bin")):
        if p.stat().st_size and not zipfile.is_zipfile(p):
            return f"{p.name} is truncated or not a torch archive"
    return None


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here (DNS or connect failure within 3 s), or None. Behind a proxy the
    direct probe proves nothing, so it is skipped."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlparse(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=3).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON",
                                                                                                  "YES", "TRUE")


def check_model_source(model: str, option: str = "--model", *, tiny: tuple[str, ...] = ()) -> None:
    """ModelError naming `model` when it cannot load here: a file; a folder without config.json or without
    weights, or with truncated weights; a name that is neither a folder nor a hub id the hub (or its cache,
    offline) can serve. `tiny`: names that are built, not loaded."""
    if model in tiny:
        return
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{option} {model}: a file, not a model folder; give the folder holding config.json "
                             "(OUTPUT/final of `c2s train`)")
        if not (path / "config.json").is_file():
            inner = [p.name for p in (path / "final", *sorted(path.glob("checkpoint-*"))[-1:])
                     if (p / "config.json").is_file()]
            hint = f"did you mean {path / inner[0]}?" if inner else (
                "give OUTPUT/final of `c2s train` or a hub id"
                + (f" ({', '.join(tiny)} for a new tiny model)" if tiny else ""))
            raise ModelError(f"{option} {model}: a folder without config.json, so not a model; {hint}")
        if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("model-*.safetensors")):
            raise ModelError(f"{option} {model}: has config.json but no weights ({WEIGHT_FILES[0]} or "
                             f"{WEIGHT_FILES[2]}); the save did not finish: save it again, or use a checkpoint")
        why = weights_problem(path)
        if why:
            raise ModelError(f"{option} {model}: {why}; the save did not finish: save it again, or use an "
                             "earlier checkpoint")
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith((".json", ".safetensors",
                                                                                    ".bin", ".pt")):
        raise ModelError(f"{option} {model}: no such folder")
    if _cached(model):
        return
    if _offline():
        raise ModelError(f"{option} {model}: not a local folder, and the hub is offline (HF_HUB_OFFLINE) with no "
                         f"copy of {model} in its cache; download it where the hub is reachable "
                         f"(`hf download {model}`) or give its local folder")
    why = hub_unreachable()
    if why:
        raise ModelError(f"{option} {model}: no such local folder, and the hub cannot be reached to fetch it as a "
                         f"hub id ({why}); give a local model folder"
                         + (f" or one of {', '.join(tiny)}" if tiny else ""))
