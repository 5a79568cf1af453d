"""Run keys (when is a build current, when may a killed run's parts be reused) and manifest helpers.

The validator that re-reads a corpus against its manifest is etl/validate.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from importlib import metadata

import schemas
from etl.rowhash import ROW_HASH_VERSION
from language.encode import ENCODER_VERSION

# Bump when the samples stage's output may change for the same inputs and options (templates, builders,
# splits, the sample hash): a samples run key with another version never counts as current.
SAMPLES_FORMAT_VERSION = 3


def formats() -> dict[str, object]:
    """Every version that decides output bytes: recorded in manifests and part of the run keys."""
    return {"schema": schemas.SCHEMA_VERSION, "encoder": ENCODER_VERSION, "row_hash": ROW_HASH_VERSION,
            "samples": SAMPLES_FORMAT_VERSION}


def code_version() -> str:
    """Package version and git commit (for the record; run keys use `formats()`, not this)."""
    try:
        version = metadata.version("c2s-corpus")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def run_key(description: dict, filters: dict, options: dict) -> str:
    """Equal keys mean an equal sentences build: source identity, filters, output-shaping options and the
    encoder/format versions (so a changed encoder never reuses stale parts, even a killed run's)."""
    f = formats()
    blob = json.dumps({"source": description, "filters": filters, "options": options,
                       "formats": {k: f[k] for k in ("schema", "encoder", "row_hash")}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def samples_key(parts: dict) -> str:
    """The samples run key: what the samples are made of (sentences content, inputs, options) + formats."""
    blob = json.dumps({**parts, "formats": formats()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
