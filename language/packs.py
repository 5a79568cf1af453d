"""Template packs: which wordings a corpus's prompts are written in (issue #22).

- `c2s` (the default): this project's own templates (language/templates/), for every task.
- `cell2sentence`: the prompt files of the user's installed cell2sentence package (the formats the released
  C2S-Scale and C2S-Pythia checkpoints were trained on), for the five tasks they word; read at build time from
  the installation, never copied into this project (that package's licence is CC BY-NC-ND).
- a folder: JSON files in the same shape (`{"model_input": [...], "response": ["..."]}`), named as
  cell2sentence names them or `<task>.json`: a lab's own pack.

A pack's task is rendered as cell2sentence's formatter renders it: one phrasing per sample (ours picks it by
hash of the sample id), `num_genes` the requested top-k whatever the cell's own length, the cell sentence its
first k genes joined by single spaces, several cells as one "Cell i:" block each, and the response template
formatted with the answer (quirks kept: "{multi_cell_sentences}." ends in ".\\n."). Tasks a pack does not word
keep this project's templates; the manifest records which pack each task used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from language.organisms import ORGANISMS
from schemas.errors import InputError

OURS = "c2s"
CELL2SENTENCE = "cell2sentence"
DEFAULT_TOP_K = 200  # C2S-Pythia-410m's cell type prediction used the top 200 genes; the card advises >= 200
# cell2sentence 1.2.0's prompt files and the task of this project each words (the package has no others)
CELL2SENTENCE_FILES = {
    "cell_type_prediction": "single_cell_cell_type_prediction_prompts.json",
    "cell_type_generation": "single_cell_cell_type_conditional_generation_prompts.json",
    "multi_cell_tissue_prediction": "multi_cell_tissue_prediction_prompts.json",
    "tissue_conditional_generation": "multi_cell_tissue_conditional_generation.json",
    "dataset_interpretation": "multi_cell_natural_lang_interpretation_prompts.json",
}
# the fields cell2sentence's formatter fills for each task: (prompt fields, response fields)
_SINGLE, _MULTI = ("num_genes", "organism"), ("num_genes", "num_cells", "organism")
FIELDS = {
    "cell_type_prediction": ({*_SINGLE, "cell_sentence"}, {"cell_type"}),
    "cell_type_generation": ({*_SINGLE, "cell_type"}, {"cell_sentence"}),
    "multi_cell_tissue_prediction": ({*_MULTI, "multi_cell_sentences"}, {"tissue"}),
    "tissue_conditional_generation": ({*_MULTI, "tissue"}, {"multi_cell_sentences"}),
    "dataset_interpretation": ({*_MULTI, "multi_cell_sentences"}, {"abstract"}),
}
INSTALL = "pip install cell2sentence --no-deps"


@dataclass(frozen=True)
class PackTask:
    """One task's wordings in a pack: its prompt phrasings and its response template."""

    prompts: tuple[str, ...]
    response: str
    file: str  # the file it was read from (its name)


@dataclass(frozen=True)
class TemplatePack:
    """A pack: its name, the tasks it words, and the genes per cell its prompts carry (top-k)."""

    name: str
    top_k_genes: int | None = None
    tasks: dict[str, PackTask] = field(default_factory=dict)
    source: str | None = None  # where it was read (the package folder, or the user's folder)
    version: str | None = None  # cell2sentence's version, when read from the package

    def covers(self, task: str) -> bool:
        return task in self.tasks

    def key(self) -> str:
        """A hash of everything that shapes the samples (it enters the samples run key)."""
        text = json.dumps({"name": self.name if self.name in (OURS, CELL2SENTENCE) else "folder",
                           "top_k": self.top_k_genes,
                           "tasks": {t: [list(p.prompts), p.response] for t, p in sorted(self.tasks.items())}},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self, tasks: Sequence[str]) -> dict:
        """What the manifest and the dataset card record: the pack, its top-k, and each task's wording."""
        return {"pack": self.name, "top_k_genes": self.top_k_genes, "source": self.source,
                "version": self.version, "key": self.key(),
                "per_task": {t: (self.name if self.covers(t) else OURS) for t in sorted(tasks)}}

    def render(self, task: str, template: int, values: dict, sentences: Sequence[Sequence[str]]) -> tuple[str, str]:
        """(prompt, completion) of `task` with phrasing number `template` (modulo the count), as
        cell2sentence's formatter fills it: `values` holds the cell's labels in words (language.prompts.
        cell_values) and, for dataset_interpretation, the abstract."""
        spec = self.tasks[task]
        k = self.top_k_genes or DEFAULT_TOP_K
        shown = [list(s[:k]) for s in sentences]
        fields = {"num_genes": str(k), "organism": values.get("organism_name") or ORGANISMS.get(
                      values.get("organism", ""), values.get("organism", "")),
                  "cell_type": values.get("cell_type"), "tissue": values.get("tissue"),
                  "abstract": values.get("abstract"), "num_cells": len(shown),
                  "cell_sentence": " ".join(shown[0]) if shown else "",
                  "multi_cell_sentences": "".join(f"Cell {i}:\n{' '.join(s)}.\n" for i, s in enumerate(shown, 1))}
        prompt = spec.prompts[template % len(spec.prompts)].format(**fields)
        return prompt, spec.response.format(**fields)


def cell2sentence_prompts() -> tuple[Path, str | None]:
    """The installed cell2sentence package's prompts folder and its version, found without importing the
    package (its __init__ imports torch, transformers and more)."""
    spec = importlib.util.find_spec(CELL2SENTENCE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"--templates {CELL2SENTENCE}: the cell2sentence package (whose prompt files this pack "
                         f"reads) is not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "prompts"
    if not folder.is_dir():
        raise InputError(f"--templates {CELL2SENTENCE}: the installed package has no prompts folder ({folder}); "
                         f"reinstall it: {INSTALL}")
    try:
        version = importlib.metadata.version(CELL2SENTENCE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return folder, version


def _read_task(path: Path, task: str) -> PackTask:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"template pack file {path}: not readable JSON ({e})") from None
    prompts, response = (spec.get("model_input"), spec.get("response")) if isinstance(spec, dict) else (None, None)
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)
            and isinstance(response, list) and response and isinstance(response[0], str)):
        raise InputError(f"template pack file {path}: expected {{\"model_input\": [phrasings], \"response\": "
                         "[one template]}} with non-empty strings")
    allowed_in, allowed_out = FIELDS[task]
    for where, texts, allowed in (("model_input", prompts, allowed_in), ("response", response[:1], allowed_out)):
        for text in texts:
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:
                raise InputError(f"template pack file {path}: {where} {text[:60]!r}: {e}") from None
            unknown = sorted(used - allowed)
            if unknown:
                raise InputError(f"template pack file {path}: {where} uses field(s) {unknown} that {task} does "
                                 f"not fill; it fills {sorted(allowed)}")
    return PackTask(tuple(prompts), response[0], path.name)


def pack_of(described: dict | None) -> TemplatePack | None:
    """The pack a corpus manifest or a model's c2s.json describes (`TemplatePack.describe`), loaded again from
    where it was read; None for this project's own templates without a top-k. A pack whose files changed since
    is refused: the model would be asked in words it was not trained on."""
    if not described or (described.get("pack") in (None, OURS) and not described.get("top_k_genes")):
        return None
    name = described.get("pack") or OURS
    pack = load_pack(name if name in (OURS, CELL2SENTENCE) else (described.get("source") or name),
                     described.get("top_k_genes"))
    if described.get("key") and pack.key() != described["key"]:
        raise InputError(f"template pack {name}: its files differ from those the corpus was built with (key "
                         f"{pack.key()} here, {described['key']} recorded); install the same version "
                         f"({described.get('version') or 'as built'}) or rebuild the corpus")
    return pack


def load_pack(spec: str | None, top_k_genes: int | None = None) -> TemplatePack:
    """The pack `spec` names: "c2s" (or None), "cell2sentence", or a folder of JSON files. InputError naming
    what is missing or malformed; a folder that words none of the five tasks is refused."""
    if top_k_genes is not None and top_k_genes < 1:
        raise InputError(f"--top-k-genes must be >= 1, got {top_k_genes}")
    if spec in (None, "", OURS):
        return TemplatePack(OURS, top_k_genes)
    version = None
    if spec == CELL2SENTENCE:
        folder, version = cell2sentence_prompts()
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise InputError(f"--templates {spec}: neither c2s, cell2sentence nor a folder of template JSON files")
    tasks = {}
    for task, name in CELL2SENTENCE_FILES.items():
        path = next((p for p in (folder / name, folder / f"{task}.json") if p.is_file()), None)
        if path is not None:
            tasks[task] = _read_task(path, task)
    if not tasks:
        raise InputError(f"--templates {spec}: {folder} holds none of the pack's files "
                         f"({', '.join(CELL2SENTENCE_FILES.values())}, or <task>.json for "
                         f"{', '.join(CELL2SENTENCE_FILES)})")
    return TemplatePack(spec if spec == CELL2SENTENCE else str(folder), top_k_genes or DEFAULT_TOP_K, tasks,
                        str(folder), version)


__all__ = ["CELL2SENTENCE", "CELL2SENTENCE_FILES", "DEFAULT_TOP_K", "OURS", "PackTask", "TemplatePack",
           "cell2sentence_prompts", "load_pack", "pack_of"]
