"""Dataset cards: each version's README.md, in the Hugging Face layout, so `datasets` reads the corpus as it is.

`load_dataset(VERSION_DIR, "cell_type_prediction")` (or `load_dataset(DIR, ...)`, whose README names the latest
version's files) gives the task's `train`, `validation`, `test` and `test_ood` splits, read from the
`samples/<task>/<split>/` folders: no hive folder guessing, no split mixed into another. The card also holds the
description, the license, the features (from schemas/) and the manifest's counts; `push_to_hub` uploads it as
the dataset page.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import yaml

import schemas
from schemas.layout import SPLIT_NAMES, parse_sample_rel
from schemas.tasks import SPLITS

_DTYPES = {pa.string(): "string", pa.large_string(): "string", pa.int64(): "int64", pa.int32(): "int32",
           pa.int16(): "int16", pa.float64(): "float64", pa.float32(): "float32", pa.bool_(): "bool"}


def features(schema: pa.Schema) -> list[dict]:
    """The schema as `datasets` features in card YAML."""
    out = []
    for f in schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            out.append({"name": f.name, "sequence": _DTYPES[f.type.value_type]})
        else:
            out.append({"name": f.name, "dtype": _DTYPES[f.type]})
    return out


def _license(manifest: dict) -> str:
    # The CELLxGENE Census data are CC BY 4.0; a user's own files carry their own terms.
    return "cc-by-4.0" if manifest.get("source", {}).get("kind") == "census" else "other"


def _sentence_globs(manifest: dict, sentences_prefix: str, versions_prefix: str) -> str | list[str]:
    """The sentences parts as data_files globs: the version's own folder, plus one folder per dataset whose
    parts an earlier version wrote (a refresh reuses them where they are)."""
    own = manifest.get("sentences_version") or manifest.get("version")
    elsewhere = sorted({(i["version"], posixpath.dirname(rel)) for rel, i in manifest.get("files", {}).items()
                        if i.get("version") and i["version"] != own})
    if not elsewhere:
        return f"{sentences_prefix}sentences/*/*/*.parquet"
    globs = [f"{versions_prefix}{vid}/{folder}/*.parquet" for vid, folder in elsewhere]
    if any(not i.get("version") or i["version"] == own for i in manifest.get("files", {}).values()):
        globs.insert(0, f"{sentences_prefix}sentences/*/*/*.parquet")
    return globs


def _templates_line(t: dict | None) -> list[str]:
    """Which template pack worded which tasks: a model continued from a released checkpoint needs its format."""
    if not t or t.get("pack") in (None, "c2s"):
        return ["- Prompts: this project's templates (pack `c2s`)"
                + (f", top {t['top_k_genes']} genes per cell" if t and t.get("top_k_genes") else "")]
    theirs = sorted(k for k, v in t.get("per_task", {}).items() if v != "c2s")
    ours = sorted(k for k, v in t.get("per_task", {}).items() if v == "c2s")
    version = f" {t['version']}" if t.get("version") else ""
    return [f"- Prompts: pack `{t['pack']}`{version}, top {t.get('top_k_genes')} genes per cell, for "
            f"{', '.join(theirs) or 'no task'}; this project's templates for {', '.join(ours) or 'no other task'}"]


def dataset_card(manifest: dict, *, prefix: str = "", sentences_prefix: str | None = None,
                 versions_prefix: str = "../") -> str:
    """README.md for the version `manifest` describes. Paths in `data_files` are relative to the folder the
    card sits in: `prefix` leads to the version's folder ("" inside it, "versions/<id>/" at DIR), and
    `sentences_prefix` to the folder holding its sentences (defaults to `prefix`)."""
    sentences_prefix = prefix if sentences_prefix is None else sentences_prefix
    samples = manifest.get("samples", {})
    per = samples.get("counts", {}).get("per_task_split", {})
    nbytes: dict[tuple[str, str], int] = {}
    for rel, meta in samples.get("files", {}).items():
        key = parse_sample_rel(rel)
        nbytes[key] = nbytes.get(key, 0) + int(meta.get("bytes", 0))
    configs, infos = [], []
    for task in sorted(per):
        splits = [s for s in SPLITS if per[task].get(s)]
        configs.append({"config_name": task, "data_files": [
            {"split": SPLIT_NAMES[s], "path": f"{prefix}samples/{task}/{s}/*.parquet"} for s in splits]})
        infos.append({"config_name": task, "features": features(schemas.SAMPLES),
                      "splits": [{"name": SPLIT_NAMES[s], "num_bytes": nbytes.get((task, s), 0),
                                  "num_examples": int(per[task][s])} for s in splits]})
    cells = manifest["counts"]["totals"]["written"]
    configs.append({"config_name": "sentences", "data_files": [
        {"split": "train", "path": _sentence_globs(manifest, sentences_prefix, versions_prefix)}]})
    infos.append({"config_name": "sentences", "features": features(schemas.SENTENCES),
                  "splits": [{"name": "train", "num_bytes": sum(int(f.get("bytes", 0)) for f in
                                                                manifest.get("files", {}).values()),
                              "num_examples": int(cells)}]})
    if configs and samples:
        default = "cell_type_prediction" if "cell_type_prediction" in per else sorted(per)[0] if per else "sentences"
        for c in configs:
            if c["config_name"] == default:
                c["default"] = True
    front = {"license": _license(manifest), "pretty_name": f"Cell sentence corpus {manifest.get('version', '')}".strip(),
             "tags": ["biology", "single-cell", "transcriptomics", "cell2sentence", "c2s"],
             "task_categories": ["text-generation"], "size_categories": [_size(sum(
                 n for d in per.values() for n in d.values()) or cells)],
             "configs": configs, "dataset_info": infos}
    return "---\n" + yaml.safe_dump(front, sort_keys=False, width=120) + "---\n\n" + _body(manifest, per)


def _size(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return name
    return "100M<n<1B"


def _body(manifest: dict, per: dict) -> str:
    src = manifest.get("source", {})
    samples = manifest.get("samples", {})
    split_note = samples.get("split_note")
    lines = [
        f"# Cell sentence corpus, version {manifest.get('version', '(unversioned)')}",
        "",
        "Single cells written as *cell sentences* (their expressed gene symbols in descending order of expression, "
        "as in cell2sentence and C2S-Scale) and a multi-task set of prompt/completion samples built from them, "
        "for training language models on single-cell biology.",
        "",
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("<this folder or repo>", "{next(iter(sorted(per)), "sentences")}")'
        "   # train / validation / test (/ test_ood)",
        "```",
        "",
        "Each task is a config; `sentences` holds one row per cell. Samples have `prompt` and `completion` "
        "(TRL's prompt-completion format), `label` (the bare answer of a prediction task) and `label_id` (its "
        "ontology id), and `cell_ids` (the cells they were built from).",
        "",
        "## Contents",
        "",
        f"- Source: {src.get('kind', '?')} {src.get('uri') or ', '.join(f['path'] for f in src.get('files', []))}"
        f"{' (Census ' + str(src.get('census_version')) + ')' if src.get('census_version') else ''}",
        f"- Cells: {manifest['counts']['totals']['written']:,} written "
        f"({manifest['counts']['totals']['planned']:,} planned); content hash `{manifest['content_hash'][:16]}`",
        f"- Samples: {samples.get('counts', {}).get('total', 0):,}; samples hash `{samples.get('samples_hash', '')}`",
        f"- Splits drawn by {samples.get('split_key_used', samples.get('options', {}).get('split_key', '?'))}"
        + (f" ({split_note})" if split_note else "") + "; held-out datasets (test_ood): "
        + (", ".join(samples.get("ood_datasets", [])) or "none"),
        *_templates_line(samples.get("templates")),
        "",
        "| task | " + " | ".join(SPLIT_NAMES[s] for s in SPLITS) + " |",
        "|---|" + "---|" * len(SPLITS),
    ]
    for task in sorted(per):
        lines.append(f"| {task} | " + " | ".join(f"{per[task].get(s, 0):,}" for s in SPLITS) + " |")
    lines += ["", "Built by c2s-corpus; the version's `manifest.json` records every option, input and count.", ""]
    return "\n".join(lines)

