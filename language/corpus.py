"""The one corpus reader: a corpus version as every tool reads it, local or in an object store alike (pyarrow.fs).

`open_corpus(uri)` resolves the version a reader sees (DIR's latest, or a pinned DIR/versions/<id>) and
serves its manifest, the sample parts per task and split (checked: a part the manifest lists must be there
and match the samples schema), the sentence parts (following parts a refresh reused from earlier versions),
the vocabularies, the inverse-transform fits, the token budget and the labels. The trainer, generate,
annotate, evaluate, GRPO, inspect and validate all read through it.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from language.budget import TokenBudget, load_tokenizer_json
from language.fit import FitStats
from language.packs import TemplatePack, pack_of
from schemas import SAMPLES, SchemaMismatch, check
from schemas.errors import CorpusError, InputError
from schemas.layout import CorpusVersion, filesystem, list_files, open_parquet, parse_sample_rel, resolve
from schemas.tasks import TASKS

log = logging.getLogger(__name__)


def open_corpus(uri: str) -> Corpus:
    """The corpus version a reader of `uri` sees; CorpusError (CorpusNotFound) naming it when there is none."""
    return Corpus(str(uri), resolve(str(uri)))


@dataclass
class Corpus:
    uri: str
    version: CorpusVersion

    @property
    def manifest(self) -> dict:
        return self.version.manifest

    # ------------------------------------------------------------ samples

    def samples_root(self) -> str:
        """The folder (path or URI) holding samples/<task>/<split>/."""
        return self.version.path("samples")

    def parts(self) -> dict[str, dict[str, list[str]]]:
        """task -> split -> its parquet parts (sorted), as the file system lists them. Unchecked:
        `sample_parts` is the checked reader."""
        return list_sample_parts(self.samples_root())

    def split_parts(self, split: str) -> dict[str, list[str]]:
        """task -> its parquet parts in `split`; tasks without parts there are absent. Unchecked."""
        return {t: by[split] for t, by in self.parts().items() if split in by}

    def sample_parts(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, list[str]]:
        """task -> the sorted parquet parts of `split`, checked before a tool reads them.

        CorpusError for a manifest without a samples section, an unknown task, a requested task without parts
        in the split, an empty split, a part whose schema is not schemas.SAMPLES, or a part the manifest lists
        that is not there (a task would silently drop out of a mixture). tasks=None: every task with parts."""
        if "samples" not in self.manifest:
            raise CorpusError(f"corpus {self.uri}: manifest.json has no 'samples' section: run the samples stage "
                              "(etl build with tasks) first")
        if tasks is not None:
            tasks = list(tasks)
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise CorpusError(f"corpus {self.uri}: unknown task(s) {', '.join(unknown)}; known tasks: "
                                  f"{', '.join(TASKS)}")
        found = self.split_parts(split)
        self._check_listed(split, found, tasks)
        if tasks is None:
            if not found:
                raise CorpusError(f"corpus {self.uri}: no sample files for split '{split}' under "
                                  f"{self.samples_root()} (empty corpus or unknown split)")
            selected = found
        else:
            missing = [t for t in tasks if t not in found]
            if missing:
                raise CorpusError(f"corpus {self.uri}: task(s) {', '.join(missing)} have no files in split "
                                  f"'{split}' (tasks with files there: {', '.join(found) or 'none'})")
            selected = {t: found[t] for t in dict.fromkeys(tasks)}
        for parts in selected.values():
            for part in parts:
                check_sample_part(part)
        return selected

    def _check_listed(self, split: str, found: dict[str, list[str]], tasks: Sequence[str] | None) -> None:
        present = {"/".join(p.replace("\\", "/").split("/")[-4:]) for ps in found.values() for p in ps}
        listed: dict[str, list[str]] = {}  # task -> the parts of this split the manifest lists
        for rel in self.manifest["samples"].get("files", {}):
            task, rel_split = parse_sample_rel(rel)
            if rel_split == split:
                listed.setdefault(task, []).append(rel)
        damaged = {}
        for t in (listed if tasks is None else [t for t in tasks if t in listed]):
            absent = [rel for rel in listed[t] if rel not in present]
            if absent:
                damaged[t] = (len(absent), len(listed[t]))
        if damaged:
            what = "; ".join(f"{t}: {a} of its {n} part(s) missing" for t, (a, n) in sorted(damaged.items()))
            raise CorpusError(f"corpus {self.uri}: split '{split}' lacks sample files its manifest lists ({what}); "
                              f"the corpus is damaged: rebuild it, or check it with `c2s validate {self.uri}`")

    def split_tasks(self, split: str) -> list[str]:
        """The tasks the manifest counts samples of in `split`."""
        per = self.manifest.get("samples", {}).get("counts", {}).get("per_task_split", {})
        return sorted(t for t, d in per.items() if d.get(split))

    def samples(self, task: str, split: str, columns: list[str]) -> pa.Table:
        """`columns` of a task's samples in a split: an empty table when the manifest counts none there;
        CorpusError naming the file when the manifest counts some and they cannot be read (a damaged corpus
        must not read as an empty one: a baseline would quietly vanish)."""
        fs, path = filesystem(self.version.path("samples", task, split))
        try:
            return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
        except (FileNotFoundError, OSError, ValueError) as e:
            if task in self.split_tasks(split):
                self.sample_parts(split, [task])  # names the missing or unreadable part
                raise CorpusError(f"corpus {self.uri}: the {task} samples of split '{split}' cannot be read "
                                  f"({e}); the corpus is damaged: rebuild it, or check it with "
                                  f"`c2s validate {self.uri}`") from e
            return pa.table({c: pa.array([], SAMPLES.field(c).type) for c in columns})

    def labels(self, task: str, split: str = "train", organism: str | None = None) -> list[str]:
        """The distinct labels of a task's split, of `organism` when it has any there."""
        uri = self.version.path("samples", task, split)
        fs, path = filesystem(uri)
        try:
            table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["label", "organism"])
        except (OSError, ValueError) as e:
            raise CorpusError(f"corpus {self.uri}: cannot read {uri} ({str(e).splitlines()[0]})") from None
        if organism is not None:
            own = table.filter(pc.equal(table["organism"], organism))
            table = own if own.num_rows else table
        return sorted({x for x in table["label"].to_pylist() if x})

    # ------------------------------------------------------------ cells

    def sentence_files(self, organism: str | None = None, dataset_id: str | None = None) -> list[str]:
        """The sentence parts (wherever each lives: a refresh reuses parts of earlier versions)."""
        return self.version.sentence_files(organism, dataset_id)

    def cell_labels(self, keys: set[tuple[str, str]], column: str = "cell_type") -> dict[tuple[str, str], str]:
        """(dataset_id, cell_id) -> a label column of those cells, from the sentences (narrow columns read)."""
        files = self.sentence_files()
        if not files or not keys:
            return {}
        fs = filesystem(files[0])[0]
        ds = pads.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
        ids = sorted({c for _, c in keys})
        t = ds.to_table(columns=["dataset_id", "cell_id", column], filter=pc.field("cell_id").isin(ids))
        return {(d, c): v for d, c, v in zip(t["dataset_id"].to_pylist(), t["cell_id"].to_pylist(),
                                             t[column].to_pylist(), strict=True) if (d, c) in keys}

    def perturbation_inputs(self) -> tuple[list[str], str]:
        """The perturbation files the manifest records and their perturbation column (read them with
        `language.h5ad.obs_values`; a corpus built elsewhere may name files this machine lacks)."""
        samples = self.manifest.get("samples", {})
        column = samples.get("options", {}).get("perturbation", {}).get("column", "perturbation")
        return list(samples.get("inputs", {}).get("perturbation", []) or []), column

    def label_values(self, column: str, organism: str | None = None) -> set[str]:
        """The distinct values of a label column of the sentences (of one organism), one narrow column read."""
        files = self.sentence_files(organism)
        if not files:
            return set()
        fs = filesystem(files[0])[0]
        ds = pads.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
        if column not in ds.schema.names:
            return set()
        return {v for v in pc.unique(ds.to_table(columns=[column])[column]).to_pylist() if v is not None}

    def organisms(self) -> list[str]:
        """The organisms the corpus has a vocabulary of."""
        fs, path = filesystem(self.version.path("vocab"))
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(posixpath.basename(i.path)[: -len(".parquet")] for i in infos if i.path.endswith(".parquet"))

    def vocab(self, organism: str, columns: list[str] | None = None) -> pa.Table:
        """The organism's vocabulary (token_id order); CorpusError naming the organisms there are."""
        fs, path = filesystem(self.version.path("vocab", f"{organism}.parquet"))
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=columns)
        except (OSError, FileNotFoundError, ValueError):
            raise CorpusError(f"corpus {self.uri}: no vocabulary for organism {organism!r}; organisms: "
                              f"{', '.join(self.organisms()) or 'none'}") from None
        return table.sort_by("token_id") if "token_id" in table.column_names else table

    def fits(self, organism: str) -> dict[str, dict]:
        """{"dataset:<id>": fit, ..., "pooled:<organism>": fit}: each {slope, intercept, r2, n_cells, kind,
        normalize_target}; the pooled fit merges the datasets' sufficient statistics. Datasets whose fit is
        not a line are left out."""
        fs, path = filesystem(self.version.path("stats", "inverse_transform.parquet"))
        try:
            rows = pq.read_table(path, filesystem=fs).to_pylist()
        except (OSError, FileNotFoundError):
            raise CorpusError(f"corpus {self.uri}: no stats/inverse_transform.parquet (rebuild the corpus with "
                              "this version of the builder)") from None
        out: dict[str, dict] = {}
        pooled = FitStats()
        for r in rows:
            if r["organism"] != organism:
                continue
            s = FitStats(int(r["n_cells"]), float(r["n_points"]), r["sum_x"], r["sum_y"], r["sum_xx"], r["sum_xy"],
                         r["sum_yy"])
            pooled = pooled + s
            slope, intercept, r2 = s.solve()
            if math.isfinite(slope) and math.isfinite(intercept):
                out[f"dataset:{r['dataset_id']}"] = {"slope": slope, "intercept": intercept, "r2": r2,
                                                     "n_cells": s.n_cells, "kind": "dataset",
                                                     "normalize_target": float(r["normalize_target"])}
        slope, intercept, r2 = pooled.solve()
        if not (math.isfinite(slope) and math.isfinite(intercept)):
            raise CorpusError(f"corpus {self.uri}: no inverse-transform fit for organism {organism!r} (its "
                              "datasets' points define no line)")
        target = next(iter(out.values()))["normalize_target"] if out else 1e4
        out[f"pooled:{organism}"] = {"slope": slope, "intercept": intercept, "r2": r2, "n_cells": pooled.n_cells,
                                     "kind": "pooled", "normalize_target": target}
        return out

    def templates(self) -> TemplatePack | None:
        """The template pack the corpus's prompts were worded in (None: this project's own, uncapped)."""
        return pack_of(self.manifest.get("samples", {}).get("templates"))

    def budget(self) -> TokenBudget:
        """The token budget the corpus's samples were cut to (an exact one when built with --tokenizer, if that
        tokenizer is readable here; else the estimate, with a warning)."""
        samples = self.manifest.get("samples", {})
        opts = samples.get("options", {})
        tok_json = None
        path = samples.get("tokenizer")
        if path:
            try:
                tok_json = load_tokenizer_json(path)
            except InputError:
                log.warning("corpus %s was cut with tokenizer %s, which is not readable here: prompts are cut "
                            "with the estimate of %s tokens per gene", self.uri, path, opts.get("tokens_per_gene"))
        kw = {"tokens_per_gene": float(opts["tokens_per_gene"])} if opts.get("tokens_per_gene") else {}
        return TokenBudget(max_tokens=int(opts.get("max_tokens") or 1024), tokenizer_json=tok_json, **kw)


def check_sample_part(path: str) -> None:
    """CorpusError unless `path` is a readable parquet file with the samples schema."""
    try:
        schema = open_parquet(path).schema_arrow
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CorpusError(f"sample part {path}: not a readable parquet file ({e})") from e
    try:
        check(schema, SAMPLES, path)
    except SchemaMismatch as e:
        raise CorpusError(f"sample part {path} does not match the samples schema: {e}") from e


def list_sample_parts(root: str) -> dict[str, dict[str, list[str]]]:
    """task -> split -> the parquet parts under root/<task>/<split>/ (a corpus's samples folder, or a folder of
    sample parts without a manifest), sorted."""
    out: dict[str, dict[str, list[str]]] = {}
    base = root.replace("\\", "/").rstrip("/")
    for uri in list_files(root, ".parquet"):
        rel = uri.replace("\\", "/")[len(base) + 1:]
        if rel.count("/") != 2:  # only <task>/<split>/<part>
            continue
        task, split, _ = rel.split("/")
        out.setdefault(task, {}).setdefault(split, []).append(uri)
    return {t: {s: sorted(p) for s, p in sorted(by.items())} for t, by in sorted(out.items())}
