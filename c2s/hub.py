"""c2s push-to-hub: a corpus version or a trained model to the Hugging Face hub, as the hub expects them.

A corpus: one version (the latest of DIR, or a pinned DIR/versions/<id>) as a dataset repo: its tables,
manifest.json and a dataset card whose configs name the files, so `load_dataset("you/repo", TASK)` gives
the splits. Sentences a samples-only version reuses from an earlier version travel with it. A model: the
folder `c2s train` wrote (`final/`), its card's front matter (base_model, datasets, library_name,
pipeline_tag, tags) completed with `--dataset`.

`--local-dir DIR` writes the repo's files to DIR/<repo_id>/ exactly as they would be uploaded, for a look
before pushing, an air-gapped mirror, or tests (the hub is not needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from etl.card import dataset_card
from etl.validate import CorpusInvalid, validate
from schemas.errors import InputError, ModelError
from schemas.extras import require
from schemas.layout import (
    MANIFEST,
    SENTENCES_TABLES,
    CorpusNotFound,
    filesystem,
    gene_counts_rel,
    part_path,
    resolve,
)
from schemas.outputs import check_output_dir
from training.model_source import check_model_source, weights_problem

log = logging.getLogger("c2s.hub")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SKIP = ("_work/",)  # build scratch, never part of a version's content


@dataclass
class Upload:
    """What one push writes: repo type, and {path in repo: source URI or local path, or bytes}."""

    repo_type: str  # dataset | model
    files: dict[str, str | bytes] = field(default_factory=dict)


def _list(uri: str) -> list[str]:
    """Every file under `uri` (local or object store), relative to it."""
    from pyarrow import fs as pafs

    fs, base = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File)


def corpus_upload(uri: str) -> Upload:
    """The files of the version readers of `uri` see, with a card whose paths are the repo's; validated first
    (CorpusInvalid naming the first damaged file: a damaged corpus is never shipped)."""

    v = resolve(uri)
    validate(v.root)
    up = Upload("dataset")
    for rel in _list(v.root):
        if rel.startswith(SKIP) or rel == "README.md" or rel.split("/")[0] in SENTENCES_TABLES:
            continue
        up.files[rel] = posixpath.join(v.root, rel)
    if MANIFEST not in up.files:
        raise InputError(f"{uri}: no {MANIFEST} in the version folder {v.root}; is it a corpus?")
    for table in ("vocab", "stats"):  # this version's own, or those of the version it reuses
        src = v.path(table)
        for rel in _list(src):
            if not rel.startswith("genes/"):
                up.files[f"{table}/{rel}"] = posixpath.join(src, rel)
    # every sentences part (and its gene counts), wherever it lives: the repo holds one self-contained version
    for rel in v.manifest["files"]:
        up.files[rel] = v.sentences_uri(part_path(v.manifest, rel))
        up.files[gene_counts_rel(rel)] = v.sentences_uri(part_path(v.manifest, rel, gene_counts_rel(rel)))
    manifest = {**v.manifest, "sentences_version": v.manifest.get("version"),
                "files": {rel: {k: x for k, x in info.items() if k != "version"}
                          for rel, info in v.manifest["files"].items()}}
    if not v.manifest.get("gene_counts"):
        for rel in v.manifest["files"]:
            up.files.pop(gene_counts_rel(rel), None)
    up.files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    up.files["README.md"] = dataset_card(manifest).encode()
    return up


def check_model_folder(folder: str) -> None:
    """ModelError unless `folder` loads as the hub will serve it: config.json (or a LoRA adapter's
    adapter_config.json) that parses, whole weights, and a tokenizer that loads."""
    adapter = not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "adapter_config.json"))
    if adapter:
        weights = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if os.path.isfile(
            os.path.join(folder, f))]
        if not weights:
            raise ModelError(f"{folder}: a LoRA adapter folder without adapter_model.safetensors; not pushed")
        why = weights_problem(Path(folder))
        if why:
            raise ModelError(f"{folder}: {why}; not pushed (save the model again)")
    else:
        check_model_source(folder, "model folder")
    config = "adapter_config.json" if adapter else "config.json"
    try:
        json.loads(Path(folder, config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}/{config}: not valid JSON ({e}); not pushed") from None
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{folder}: no tokenizer (tokenizer.json or tokenizer_config.json), so the pushed "
                         "model could not be used; save the tokenizer beside it (tokenizer.save_pretrained)")
    try:
        from transformers import AutoTokenizer
    except ImportError:  # the hub extra alone: the fast tokenizer file is checked with `tokenizers`
        tok_json = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(tok_json):
            try:
                from tokenizers import Tokenizer

                Tokenizer.from_file(tok_json)
            except ImportError:
                pass
            except Exception as e:  # tokenizers raises its own Exception type
                raise ModelError(f"{tok_json}: the tokenizer does not load ({e}); not pushed") from None
        return
    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # several libraries' errors: one line naming the folder
        raise ModelError(f"{folder}: its tokenizer does not load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); not pushed") from None


def model_upload(folder: str, datasets: list[str] | None = None) -> Upload:
    """A saved model folder (config.json, weights, tokenizer, README.md), its card completed with `datasets`;
    checked first (a folder the hub would serve but nobody could load is refused)."""
    if not os.path.isfile(os.path.join(folder, "config.json")) and not os.path.isfile(
            os.path.join(folder, "adapter_config.json")):
        raise InputError(f"{folder}: neither a corpus (latest.json / manifest.json) nor a model folder "
                         "(config.json); give a corpus DIR or a trained model's final/ folder")
    check_model_folder(folder)
    up = Upload("model")
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            up.files[os.path.relpath(path, folder).replace(os.sep, "/")] = path
    card = os.path.join(folder, "README.md")
    text = Path(card).read_text(encoding="utf-8") if os.path.isfile(card) else ""
    up.files["README.md"] = _with_front(text, {"datasets": datasets} if datasets else {}).encode()
    return up


def _with_front(text: str, extra: dict) -> str:
    """A card with its YAML front matter updated by `extra` (created when missing)."""
    front, body = {}, text
    if text.startswith("---\n") and "\n---" in text[4:]:
        head, _, body = text[4:].partition("\n---")
        front = yaml.safe_load(head) or {}
        body = body.lstrip("-").lstrip("\n")
    front.update(extra)
    front.setdefault("library_name", "transformers")
    front.setdefault("pipeline_tag", "text-generation")
    front.setdefault("tags", ["cell2sentence", "c2s", "single-cell"])
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body


def _read(src: str | bytes) -> bytes:
    if isinstance(src, bytes):
        return src

    fs, path = filesystem(src)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_local(up: Upload, repo_id: str, local_dir: str) -> str:
    """The repo's files under local_dir/<repo_id>/ (replacing what was there); its path."""
    dest = os.path.join(local_dir, *repo_id.split("/"))
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    for rel, src in up.files.items():
        path = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(src, str) and "://" not in src:
            shutil.copyfile(src, path)
        else:
            with open(path, "wb") as fh:
                fh.write(_read(src))
    return dest


def push(up: Upload, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, message: str | None = None) -> str:
    """One commit with every file (created repo if needed); the commit URL."""
    hub = require("huggingface_hub", "c2s push-to-hub")
    CommitOperationAdd, HfApi = hub.CommitOperationAdd, hub.HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=up.repo_type, private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, str) and "://" not in src
                              else _read(src)) for rel, src in sorted(up.files.items())]
    info = api.create_commit(repo_id, ops, repo_type=up.repo_type, revision=revision,
                             commit_message=message or f"c2s push-to-hub ({len(ops)} files)")
    return getattr(info, "commit_url", str(info))


def upload_for(path: str, datasets: list[str] | None = None) -> Upload:
    """A corpus (DIR or DIR/versions/<id>) or a model folder, told apart by what it holds."""
    try:
        return corpus_upload(path)
    except CorpusNotFound:
        return model_upload(path, datasets)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m c2s.hub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  c2s push-to-hub corpus you/c2s-corpus\n"
                                       "  c2s push-to-hub outputs/sft/final you/c2s-pythia-410m "
                                       "--dataset you/c2s-corpus\n"
                                       "  c2s push-to-hub corpus you/c2s-corpus --local-dir hub_preview\n\n"
                                       "The token comes from `huggingface-cli login`, HF_TOKEN or --token.")
    p.add_argument("path", metavar="CORPUS_OR_MODEL", help="a corpus DIR (its latest version), a pinned "
                   "DIR/versions/<id>, or a trained model folder (OUTPUT/final)")
    p.add_argument("repo_id", metavar="OWNER/NAME", help="the hub repository (created if missing)")
    p.add_argument("--dataset", action="append", default=[], metavar="OWNER/NAME",
                   help="a model's training corpus on the hub (the card's datasets field; repeatable)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (default: main)")
    p.add_argument("--token", metavar="TOKEN", help="hub token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--local-dir", metavar="DIR", help="write the repo's files to DIR/OWNER/NAME instead of "
                   "pushing (no network)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not REPO_ID.match(args.repo_id):
            raise InputError(f"repo id {args.repo_id!r}: expected OWNER/NAME (letters, digits, . _ -)")
        bad = [d for d in args.dataset if not REPO_ID.match(d)]
        if bad:
            raise InputError(f"--dataset {bad[0]!r}: expected OWNER/NAME of a dataset on the hub")
        if not os.path.exists(args.path) and "://" not in args.path:
            raise InputError(f"{args.path}: no such corpus or model folder")
        if args.local_dir:
            check_output_dir(args.local_dir, "--local-dir")  # before the corpus or model is packaged
        up = upload_for(args.path, args.dataset)
        if args.local_dir:
            dest = write_local(up, args.repo_id, args.local_dir)
            log.info("wrote the %s repo %s (%d files) to %s", up.repo_type, args.repo_id, len(up.files), dest)
            print(dest)
            return 0
        url = push(up, args.repo_id, private=args.private, revision=args.revision, token=args.token)
    except CorpusInvalid as e:  # as `c2s validate`: exit 1, the corpus is invalid
        log.error("%s; not pushed", e)
        return 1
    except InputError as e:
        log.error("%s", e)
        return 2
    except Exception as e:  # network, auth: one line; the hub's own message says what to do
        log.error("push-to-hub %s failed: %s: %s", args.repo_id, type(e).__name__, str(e).splitlines()[0][:300])
        return 1
    log.info("pushed the %s repo %s (%d files): %s", up.repo_type, args.repo_id, len(up.files), url)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
