"""c2s inspect DIR: what is in a corpus, read from its files (not only its manifest).

Counts per task and split (parquet footers, checked against the manifest), a few samples per task as they
read, the most common labels per prediction task and the token lengths per task (PNG plots), and the
leakage check: cells in two splits, and held-out datasets (test_ood) found in another split. Reads one file
at a time, a few columns each; the cell check holds 8 bytes per cell reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl import rowhash
from etl.storage import Store
from etl.validate import CorpusInvalid, reading
from language.corpus import open_corpus
from schemas.errors import ConfigError
from schemas.layout import SPLIT_NAMES, CorpusNotFound, CorpusVersion, parse_sample_rel
from schemas.outputs import check_output_dir
from schemas.tasks import SPLITS

log = logging.getLogger("etl.inspect")


def _sample_files(v: CorpusVersion) -> list[str]:
    return sorted(v.manifest.get("samples", {}).get("files", {}))


def inspect(uri: str, n_examples: int = 2, top_labels: int = 15) -> dict:
    """The report of the corpus readers of `uri` see (a dict; `render` makes it text)."""
    v = open_corpus(uri).version
    store = Store(v.root)
    counts: dict[str, Counter] = {}
    labels: dict[str, Counter] = {}
    lengths: dict[str, list[np.ndarray]] = {}
    examples: dict[str, list[dict]] = {}
    keys: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    ood = set(v.manifest.get("samples", {}).get("ood_datasets", []))
    ood_elsewhere: Counter = Counter()
    for rel in _sample_files(v):
        task, split = parse_sample_rel(rel)
        with reading(rel):
            f = pq.ParquetFile(store.fs_root[0].open_input_file(store.path(rel)))
            t = f.read(columns=["dataset_id", "cell_ids", "label", "est_tokens"])
        counts.setdefault(task, Counter())[split] += f.metadata.num_rows
        if t.num_rows == 0:
            continue
        if split in ("train", "val", "test") and ood:
            hit = pc.is_in(t["dataset_id"], pa.array(sorted(ood)))
            ood_elsewhere[split] += int(pc.sum(hit).as_py() or 0)
        lab = t["label"].drop_null().to_pylist()
        if lab:
            labels.setdefault(task, Counter()).update(lab)
        lengths.setdefault(task, []).append(t["est_tokens"].to_numpy(zero_copy_only=False))
        lens = pc.list_value_length(t["cell_ids"]).to_numpy(zero_copy_only=False)
        if lens.sum():
            ds = pa.array(np.repeat(np.asarray(t["dataset_id"].to_pylist(), dtype=object), lens), pa.string())
            keys.setdefault(split, []).append(
                np.unique(rowhash.cell_keys(ds, pa.chunked_array(t["cell_ids"]).combine_chunks().flatten())))
        if split == "train" and len(examples.get(task, [])) < n_examples:
            with reading(rel):
                rows = f.read_row_group(0, columns=["prompt", "completion", "label"]).slice(
                    0, n_examples - len(examples.get(task, []))).to_pylist()
            examples.setdefault(task, []).extend(rows)
    uniq = {s: np.unique(np.concatenate(k)) if k else np.zeros(0, np.uint64) for s, k in keys.items()}
    shared = {f"{a}/{b}": int(np.intersect1d(uniq[a], uniq[b], assume_unique=True).size)
              for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:] if len(uniq[a]) and len(uniq[b])}
    manifest_counts = v.manifest.get("samples", {}).get("counts", {}).get("per_task_split", {})
    per_task = {t: {s: int(c[s]) for s in SPLITS if c[s]} for t, c in sorted(counts.items())}
    mismatch = sorted(t for t in set(per_task) | set(manifest_counts)
                      if per_task.get(t, {}) != {s: n for s, n in manifest_counts.get(t, {}).items() if n})
    length_stats = {}
    for task, parts in sorted(lengths.items()):
        x = np.concatenate(parts)
        length_stats[task] = {"mean": round(float(x.mean()), 1), "p50": int(np.percentile(x, 50)),
                              "p95": int(np.percentile(x, 95)), "max": int(x.max())}
    m = v.manifest
    return {
        "corpus": uri, "version": v.version, "root": v.root,
        "cells": m["counts"]["totals"]["written"], "content_hash": m["content_hash"],
        "samples": sum(sum(d.values()) for d in per_task.values()),
        "split_key": m.get("samples", {}).get("split_key_used") or m.get("samples", {}).get("options", {}).get(
            "split_key"), "split_note": m.get("samples", {}).get("split_note"),
        "per_task_split": per_task, "counts_match_manifest": not mismatch, "counts_differ": mismatch,
        "labels": {t: c.most_common(top_labels) for t, c in sorted(labels.items())},
        "distinct_labels": {t: len(c) for t, c in sorted(labels.items())},
        "token_lengths": length_stats,
        "leakage": {"cells_shared": shared, "ood_datasets": sorted(ood), "ood_rows_in_other_splits": dict(
            ood_elsewhere), "ok": not any(shared.values()) and not any(ood_elsewhere.values())},
        "examples": examples,
        "_lengths": {t: np.concatenate(p) for t, p in lengths.items()},
    }


def render(r: dict) -> str:
    """The report as text for a terminal."""
    out = [f"corpus {r['corpus']}: version {r['version']}, {r['cells']:,} cells, {r['samples']:,} samples, "
           f"content hash {r['content_hash'][:16]}",
           f"splits drawn by {r['split_key']}" + (f" ({r['split_note']})" if r["split_note"] else ""), ""]
    head = f"{'task':<36}" + "".join(f"{SPLIT_NAMES[s]:>12}" for s in SPLITS) + f"{'tokens p50/p95':>18}"
    out += [head, "-" * len(head)]
    for task, c in r["per_task_split"].items():
        tl = r["token_lengths"].get(task, {})
        out.append(f"{task:<36}" + "".join(f"{c.get(s, 0):>12,}" for s in SPLITS)
                   + f"{str(tl.get('p50', '')) + '/' + str(tl.get('p95', '')):>18}")
    if not r["counts_match_manifest"]:
        out.append(f"WARNING: counts read differ from the manifest for {', '.join(r['counts_differ'])}")
    lk = r["leakage"]
    out += ["", "leakage check: " + ("ok (no cell in two splits; held-out datasets only in test_ood)" if lk["ok"]
                                     else f"FOUND cells shared {lk['cells_shared']}, held-out dataset rows "
                                          f"elsewhere {lk['ood_rows_in_other_splits']}")]
    for task, top in r["labels"].items():
        shown = ", ".join(f"{lab} ({n:,})" for lab, n in top[:5])
        out.append(f"labels of {task} ({r['distinct_labels'][task]} distinct): {shown}")
    out.append("")
    for task, rows in r["examples"].items():
        for row in rows:
            prompt = row["prompt"] if len(row["prompt"]) < 400 else row["prompt"][:400] + " ..."
            comp = row["completion"] if len(row["completion"]) < 200 else row["completion"][:200] + " ..."
            out += [f"--- {task}", prompt, f">>> {comp}"]
    return "\n".join(out)


def plot(r: dict, out_dir: str) -> list[str]:
    """labels_<task>.png (most common labels) and token_lengths.png (per task); the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for task, top in r["labels"].items():
        if not top:
            continue
        names, values = zip(*reversed(top), strict=True)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.2))
        ax.barh([n if len(n) <= 48 else n[:45] + "..." for n in names], values, color="#4c72b0")
        ax.set_xlabel("samples")
        ax.set_title(f"{task}: most common labels ({r['distinct_labels'][task]} distinct)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"labels_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    lengths = r["_lengths"]
    if lengths:
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(lengths) + 1.5))
        tasks = sorted(lengths)
        ax.boxplot([lengths[t] for t in tasks], vert=False, tick_labels=tasks, showfliers=False)
        ax.set_xlabel("estimated tokens per sample (prompt + completion)")
        ax.set_title("token lengths per task")
        fig.tight_layout()
        path = os.path.join(out_dir, "token_lengths.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m etl.inspect_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", metavar="DIR_OR_VERSION", help="a corpus directory (its latest version) or "
                   "DIR/versions/<id>; local path or s3://bucket/prefix")
    p.add_argument("--examples", type=int, default=2, metavar="N", help="samples shown per task (default 2)")
    p.add_argument("--output-dir", "--out", dest="out", metavar="DIR", help="write report.json and the PNG "
                   "plots here (default: inspect-<version> in the current folder)")
    p.add_argument("--no-plots", action="store_true", help="text only")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.out and not args.no_plots:
            check_output_dir(args.out, "--output-dir")  # before the corpus is read
        r = inspect(args.corpus, n_examples=args.examples)
        out = args.out or f"inspect-{r['version'] or 'corpus'}"
        if not args.no_plots and not args.out:
            check_output_dir(out, "--output-dir")
    except (CorpusNotFound, ConfigError) as e:
        log.error("%s", e)
        return 2
    except CorpusInvalid as e:  # a file of the corpus missing or unreadable: the corpus is invalid
        log.error("invalid: %s", e)
        return 1
    public = {k: v for k, v in r.items() if not k.startswith("_")}
    print(json.dumps(public, indent=1) if args.json else render(r))
    if not args.no_plots:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as fh:
            json.dump(public, fh, indent=1)
        paths = plot(r, out)
        log.info("wrote %s/report.json and %d plots", out, len(paths))
    return 0 if r["leakage"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
