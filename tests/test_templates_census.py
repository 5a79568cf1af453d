"""Prompts that read right on real Census labels.

Every template of every task is rendered, through the builders' own functions (cell_values, fill), over
the whole label vocabularies the Census draws from, read offline from cellxgene-ontology-guide: cell types
(CL), tissues (UBERON, and CL for cell cultures), diseases (MONDO, "normal", and several joined by " || " as
the Census joins them), development stages (HsapDv, MmusDv), assays (EFO) and sexes. Each text is checked
for: no " || ", no word doubled by the template ("tissue tissue", "cell cell"), "a"/"an" as said aloud, no
unfilled field, no double space, and no punctuation doubled or spaced where a label meets the template.

The article rule is checked apart from its code: against hand-written phrases (truth a reader can check),
and for plain words against a crude spelling rule written here.
"""

from __future__ import annotations

import re
from functools import cache

import pytest

from etl.tasks import TASKS
from etl.tasks import perturbation as pt
from etl.tasks.builders import multi_cell_samples, single_cell_samples
from etl.tasks.common import Counts, SampleContext
from language import templates
from language.budget import TokenBudget
from language.organisms import ORGANISMS
from language.phrases import article, cell_kind, format_lr, format_pairs, parse_lr, parse_pairs
from language.prompts import KIND_PHRASES, bare, cell_values, fill, perturbation_words

GENES = ["ACTB", "HLA-A", "NKX2-1"]
BASE_CELL = {"cell_id": "c1", "organism": "homo_sapiens", "dataset_id": "d1", "donor_id": "x", "split": "train",
             "tissue": "lung", "cell_type": "T cell", "disease": "normal", "sex": "female",
             "development_stage": "adult stage", "assay": "10x 3' v3", "genes": GENES}
EXTRAS = {"num_cells": 2, "cell_types": "T cell; B cell", "abstract": "We profiled cells.", "gene_set": "HALLMARK_X",
          "genes": "A B", "pairs": "HLA-A and NKX2-1", "answer": "yes", "neighbor_sentence": "ACTB HLA-A"}
CTX = SampleContext(mixture={}, budget=TokenBudget(max_tokens=100_000))

# The hand-written truth: a phrase as a careful writer puts it (most are real CL/UBERON labels).
ARTICLE_TRUTH = [
    "an epithelial cell", "an endothelial cell", "an oocyte", "an alpha-beta T cell", "an adipose tissue",
    "a T cell", "a B cell", "a CD4-positive helper T cell", "a GABAergic interneuron", "a hepatocyte",
    "a Hofbauer cell", "a Langerhans cell", "a Schwann cell",
    "an NK cell", "an L2/3 intratelencephalic projecting glutamatergic neuron", "an L6b glutamatergic cortical neuron",
    "an M cell of gut", "an S cone cell", "an L cone cell", "an H1 horizontal cell", "an MHC-II-negative classical monocyte",
    "an ILC1", "an IgA memory B cell", "an Fc-epsilon RIalpha-low mast cell progenitor", "an oRGC1", "an X chromosome-bearing sperm cell",
    "a Y chromosome-bearing sperm cell", "a UV sensitive photoreceptor cell", "a pH receptor cell",
    "a uterine cervix", "a unipolar neuron", "a urothelial cell", "a ureter", "a utricle of membranous labyrinth",
    "a uvea", "a unicellular gland", "a uninucleate conidium",
    "an upper lobe of left lung", "an umbilical artery endothelial cell", "an ulnar artery", "an unknown",
    "an undifferentiated cell of bronchus epithelium", "an unencapsulated tactile receptor", "an unmyelinated nerve fiber",
    "an uninfected cell", "an hour", "an honest answer",
    "a eukaryotic cell", "a Eustachian tube", "a Ewing sarcoma", "a one-pass circulatory system",
    "a yolk cell", "a yellow bone marrow", "an ypsiloid cartilage", "a xiphoid process",
    "an 8 cell stage", "an 11-year-old stage", "an 18th week post-fertilization stage", "an 80 year-old and over stage",
    "an 8th arch", "a 2 cell stage", "a 110-year-old stage", "a 1st arch pharyngeal cleft",
    "a SARS-CoV-2 infection", "a COVID-19 case", "an HIV infection", "an ALS case",
]


def independent_article(phrase: str) -> str | None:
    """A crude spelling rule, written apart from etl/tasks/phrases.py, for plain words only (None: not sure)."""
    w = re.split(r"[\s\-/(,]", phrase, maxsplit=1)[0]
    if not w.isalpha() or not (w.islower() or (w[0].isupper() and w[1:].islower() and len(w) > 2)):
        return None
    w = w.lower()
    if w[0] in "bcdfgjklmnpqrstvwz" or (w[0] == "x" and len(w) > 1) or (w[0] == "y" and w[1:2] in tuple("aeiou")):
        return "a"
    if w[0] == "h":
        return None if w.startswith(("hour", "hon", "heir")) else "a"
    if w[0] in "ai" or (w[0] == "e" and not w.startswith(("eu", "ew"))) or (w[0] == "o" and not w.startswith("one")):
        return "an"
    return None


@cache
def vocab() -> dict[str, list[str]]:
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()

    def terms(onto: str) -> list[str]:
        return sorted(x for x in parser.get_term_label_to_id_map(onto) if x and not x.lower().startswith("obsolete"))

    cl, mondo = terms("CL"), terms("MONDO")
    several = [" || ".join(mondo[i : i + k]) for k in (2, 3) for i in range(0, len(mondo) - 3, 997)]
    return {"cell_type": [*cl, "unknown"], "tissue": [*terms("UBERON"), *cl, "unknown"],
            "disease": ["normal", *mondo, "COVID-19 || influenza", *several],
            "development_stage": [*terms("HsapDv"), *terms("MmusDv"), "unknown"],
            "sex": ["female", "male", "unknown"], "assay": terms("EFO"), "organism": sorted(ORGANISMS)}


_ARTICLE = re.compile(r"(?:(?<=^)|(?<=[\s(\"']))(a|an)(?= )|(?:(?<=^)|(?<=\n)|(?<=\. ))(A|An)(?= )", re.M)
_DOUBLED = re.compile(r"\b(\w+)\s+\1s?\b", re.I)
_PUNCT = re.compile(r"[.;,:][.;,:]| [.;,:]| \n|\n | {2}")
_WORD = re.compile(r"\w+")


def text_problems(text: str, own: str = "") -> list[str]:
    """What reads wrong anywhere in a text (a template's own wording); what lies inside `own` (a label's own
    words) is not the template's."""
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(own), text)] if own else []
    out = [f"doubled word {m.group(0)!r}" for m in _DOUBLED.finditer(text) if m.group(0) not in own]
    out += [f"punctuation {m.group(0)!r}" for m in _PUNCT.finditer(text) if m.group(0) not in own]
    out += ["unfilled field"] * ("{" in text or "}" in text)
    for m in _ARTICLE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        art, rest = (m.group(1) or m.group(2)).lower(), text[m.end() + 1 : m.end() + 40]
        if article(rest) != art:
            out.append(f"{art!r} before {rest!r} (the rule says {article(rest)!r})")
    return out


def problems(text: str, label: str, seen: dict[str, int]) -> list[str]:
    """What reads wrong where a template meets `label` (as filled: in words): " || ", unfilled fields and
    double spaces anywhere; at each place the label sits, a word doubled across its edges, punctuation
    doubled or spaced at its end, and the article before it."""
    out = []
    if "{" in text or "}" in text:
        out.append("unfilled field")
    if "||" in text or "  " in text:
        out.append("' || ' or a double space")
    words = _WORD.findall(label)
    at = text.find(label)
    if at < 0:
        out.append("label not in text")
    while at >= 0:
        end = at + len(label)
        before, after = text[max(0, at - 4) : at], text[end : end + 40]
        prev = re.search(r"(\w+)\s+$", text[max(0, at - 40) : at]) if label[:1].isalnum() else None
        nxt = re.match(r"\s+(\w+)", after) if label[-1:].isalnum() else None  # words apart by spaces only
        if words and prev and prev[1].lower() == words[0].lower():
            out.append(f"doubled word {prev[1]!r} before the label")
        if words and nxt and nxt[1].lower() in (words[-1].lower(), words[-1].lower() + "s"):
            out.append(f"doubled word {nxt[1]!r} after the label")
        if label[-1:] in ".;,:" and after[:1] in tuple(".;,:"):
            out.append(f"punctuation {label[-1] + after[0]!r} after the label")
        if after[:1] == " " and after[1:2] in tuple(".;,:"):
            out.append("a space before punctuation after the label")
        m = re.search(r"(?:^|[\s(])(an?|An?) $", before)
        if m:
            art = m.group(1).lower()
            seen["before_label"] += 1
            if article(label) != art:
                out.append(f"{art!r} before {label!r} (the rule says {article(label)!r})")
            expected = independent_article(label)
            if expected is not None:
                seen["checked"] += 1
                if expected != art:
                    out.append(f"{art!r} before {label!r}: a plain word wants {expected!r}")
        at = text.find(label, end)
    return out


FIELDS = ("cell_type", "tissue", "disease", "development_stage", "sex", "assay", "organism")
NAMES = {f: {f} for f in FIELDS} | {"cell_type": {"cell_type", "cell_kind"}, "organism": {"organism_name"}}


def _field_uses() -> dict[str, dict[str, tuple[list[int], bool]]]:
    """field -> task -> (the prompts naming the field, or what cell_values() derives from it: cell_kind from
    cell_type; whether the response names it)."""
    out: dict[str, dict[str, tuple[list[int], bool]]] = {}
    for task, spec in TASKS.items():
        if not spec.built or task == pt.TASK or spec.family == "knowledge":
            continue
        t = templates.load(task)
        for field in FIELDS:
            names = NAMES[field]
            used = [i for i, p in enumerate(t["prompts"]) if names & templates.fields(p)]
            answer = bool(names & templates.fields(t["response"]))
            if used or answer:
                out.setdefault(field, {})[task] = (used, answer)
    return out


def _values(task: str, cell: dict) -> dict:
    """The values fill() fills a template with (cell_values() of the cell, sentences of GENES, task extras)."""
    n = 2 if TASKS[task].family in ("multi", "spatial") else 1
    return {**cell_values(cell), **EXTRAS, "num_genes": len(GENES), "cell_sentence": " ".join(GENES),
            "cells": "".join(f"Cell {i}:\n{' '.join(GENES)}.\n" for i in range(1, n + 1))}


def _render(task: str, t: int, cell: dict) -> tuple[str, str]:
    values = {**cell_values(cell), **EXTRAS}
    n = 2 if TASKS[task].family in ("multi", "spatial") else 1
    prompt, response, _ = fill(task, t, values, [GENES] * n, CTX.budget)
    return prompt, response


def test_every_template_reads_right_over_the_census_vocabularies():
    seen = {"checked": 0, "before_label": 0, "renders": 0}
    bad: dict[str, list[str]] = {}
    uses = _field_uses()
    for task in {t for ts in uses.values() for t in ts}:  # each template's own wording, whole, once
        spec, values = templates.load(task), _values(task, BASE_CELL)
        # the fast path below fills templates with what fill() fills them with
        assert _render(task, 0, BASE_CELL) == (templates.fill(spec["prompts"][0], values),
                                               templates.fill(spec["response"], values).rstrip("\n"))
        for t in range(len(spec["prompts"])):
            for text in _render(task, t, BASE_CELL):
                for p in text_problems(text):
                    bad.setdefault(p, []).append(f"{task}[{t}]")
    for field, tasks in uses.items():
        key = "organism" if field == "organism" else field
        for label in vocab()[field]:
            cell = {**BASE_CELL, key: label}
            shown = cell_values(cell)["organism_name" if field == "organism" else field]
            for task, (ts, answer) in tasks.items():
                spec, values = templates.load(task), _values(task, cell)
                texts = [(t, templates.fill(spec["prompts"][t], values)) for t in ts]
                if answer:
                    texts.append((-1, templates.fill(spec["response"], values).rstrip("\n")))
                seen["renders"] += len(texts)
                for t, text in texts:
                    for p in problems(text, shown, seen):
                        bad.setdefault(p, []).append(f"{task}[{t}] {label!r}")
    assert not bad, "\n".join(f"{p}: {len(w)} e.g. {w[:3]}" for p, w in sorted(bad.items())[:40])
    assert seen["renders"] > 450_000
    assert seen["before_label"] > 30_000 and seen["checked"] > 0.8 * seen["before_label"], seen


def test_a_blank_label_reads_unknown():
    cell = {**BASE_CELL, "tissue": "", "cell_type": " "}
    assert cell_values(cell)["tissue"] == cell_values(cell)["cell_type"] == "unknown"
    assert cell_values(cell)["cell_kind"] == "cell of unknown type"
    assert "from an unknown tissue section" in _render("neighbor_generation", 0, cell)[0]


def test_templates_end_as_they_intend():
    """A prompt ends with : ? or . or continues into the answer (ends with a word); an answer ends with '.'
    (or with the cells or abstract it writes), whatever label sits before the end."""
    for task, spec in TASKS.items():
        if not spec.built:
            continue
        t = templates.load(task)
        for p in t["prompts"]:
            assert p[-1] in ":?." or p[-1].isalpha() or p.endswith("}"), (task, p[-20:])
        assert t["response"].endswith(".") or t["response"].endswith(("{cells}", "{abstract}")), task
    for label in vocab()["tissue"][:: 50] + vocab()["disease"][:: 50] + vocab()["cell_type"][:: 10]:
        cell = {**BASE_CELL, "tissue": label, "disease": label, "cell_type": label}
        for task in ("tissue_prediction", "metadata_prediction", "cell_type_prediction"):
            _, response = _render(task, 0, cell)
            assert response.endswith(".") and not response.endswith(("..", ";.", ",.")), response


def test_article_rule_against_hand_written_truth():
    for phrase in ARTICLE_TRUTH:
        art, rest = phrase.split(" ", 1)
        assert article(rest) == art, phrase
    cl = set(vocab()["cell_type"])
    for phrase in ARTICLE_TRUTH:  # as a template renders them: cell_type_generation "Describe {cell_kind:a}"
        rest = phrase.split(" ", 1)[1]
        if rest in cl and " " in rest and not rest.startswith("unknown"):
            prompt, _ = _render("cell_type_generation", 6, {**BASE_CELL, "cell_type": rest})
            assert f"Describe {phrase} from Homo sapiens" in prompt
    tissues = {"adipose tissue": "from an adipose tissue section", "lung": "from a lung tissue section",
               "uterine cervix": "from a uterine cervix tissue section", "unknown": "from an unknown tissue section",
               "upper lobe of left lung": "from an upper lobe of left lung tissue section"}
    for tissue, want in tissues.items():
        prompt, _ = _render("neighbor_generation", 0, {**BASE_CELL, "tissue": tissue})
        assert want in prompt
    prompt, _ = _render("neighbor_generation", 4, {**BASE_CELL, "tissue": "adipose tissue"})
    assert "located in adipose tissue has" in prompt


def test_multi_valued_labels_are_joined_in_words():
    cell = {**BASE_CELL, "disease": "COVID-19 || influenza", "sex": "male"}
    _, response = _render("metadata_prediction", 0, cell)
    assert response == " COVID-19 and influenza; male; adult stage; 10x 3' v3."
    three = {**cell, "disease": "COVID-19 || influenza || asthma"}
    assert _render("metadata_prediction", 0, three)[1].startswith(" COVID-19, influenza and asthma; male")
    # the label column is the bare answer, and the cell-type answer is the Census string itself
    ctx = SampleContext(mixture={"metadata_prediction": 1.0, "cell_type_prediction": 1.0},
                        budget=TokenBudget(max_tokens=4096))
    ct = "CD4-positive, alpha-beta T cell"
    rows = list(single_cell_samples({**three, "cell_type": ct}, ctx, Counts()))
    assert {r["task"] for r in rows} == {"metadata_prediction", "cell_type_prediction"}
    for r in rows:
        assert r["label"] == bare(r["completion"]) and "||" not in r["prompt"] + r["completion"]
        if r["task"] == "cell_type_prediction":
            assert r["label"] == ct
    # several cells' types: separated by semicolons, as Census labels hold commas
    group = [{**BASE_CELL, "cell_id": f"c{i}", "cell_type": t} for i, t in enumerate([ct, "B cell", ct])]
    ctx = SampleContext(mixture={"multi_cell_cell_type_prediction": 100.0}, budget=TokenBudget(max_tokens=4096))
    rows = list(multi_cell_samples(group, ctx, Counts()))
    assert rows and all(r["completion"] == f" {ct}; B cell; {ct}." for r in rows)


def test_gene_pairs_parse_back_with_hyphenated_symbols():
    pairs = [("HLA-A", "KIR2DL1"), ("NKX2-1", "HLA-DRB1"), ("MT-CO1", "MT-ND1-AS"), ("A", "B")]
    text = format_pairs(pairs)
    assert text == "HLA-A and KIR2DL1; NKX2-1 and HLA-DRB1; MT-CO1 and MT-ND1-AS; A and B"
    assert parse_pairs(text) == pairs
    for bad in ("HLA-A-KIR2DL1", "HLA-A and", "HLA A and B"):
        with pytest.raises(ValueError):
            parse_pairs(bad)
    lr = [("HLA-E", 1, "KLRC1_KLRD1", 2), ("CD74", 2, "MIF", 1)]
    assert parse_lr(format_lr(lr)) == lr
    # built samples: every answer parses to BioGRID pairs of the cell's shown genes, in the prompts' wording
    genes = ["HLA-A", "KIR2DL1", "NKX2-1", "FOXA1", "HLA-DRB1", "CD74", *(f"G{i}" for i in range(10))]
    index = {"HLA-A": frozenset({"KIR2DL1", "CD74"}), "KIR2DL1": frozenset({"HLA-A"}),
             "NKX2-1": frozenset({"FOXA1", "HLA-DRB1"}), "FOXA1": frozenset({"NKX2-1"}),
             "HLA-DRB1": frozenset({"NKX2-1", "CD74"}), "CD74": frozenset({"HLA-A", "HLA-DRB1"})}
    truth = {frozenset((a, b)) for a, ps in index.items() for b in ps}
    ctx = SampleContext(mixture={"gene_interaction_prediction": 8.0}, budget=TokenBudget(max_tokens=4096),
                        biogrid={"homo_sapiens": index})
    rows = list(single_cell_samples({**BASE_CELL, "genes": genes}, ctx, Counts()))
    assert rows
    for r in rows:
        got = parse_pairs(r["label"])
        assert len(got) == len(set(map(frozenset, got))) and set(map(frozenset, got)) == truth  # all 5, once


def test_perturbation_prompts_name_the_kind_when_the_file_gives_it():
    words = perturbation_words
    assert words(("KLF1",), "CRISPRi") == {"perturbation": "CRISPRi knockdown of KLF1",
                                           "the_perturbation": "CRISPRi knockdown of KLF1"}
    assert words(("KLF1", "MAP2K6"), "crispr_activation")["perturbation"] == "CRISPRa activation of KLF1 and MAP2K6"
    assert words(("dexamethasone",), "drug")["the_perturbation"] == "treatment with dexamethasone"
    assert words(("KLF1",), "knockout")["perturbation"] == "knockout of KLF1"
    assert words(("KLF1",), None) == {"perturbation": "KLF1", "the_perturbation": "the perturbation KLF1"}
    assert words(("KLF1",), "unknown")["the_perturbation"] == "the perturbation KLF1"
    assert words(("KLF1", "MAP2K6"), None)["the_perturbation"] == "the combined perturbation KLF1 and MAP2K6"
    ctrl = {"cell_id": "k0", "organism": "homo_sapiens", "dataset_id": "p", "genes": GENES, "cell_type": "K562"}
    pert = {**ctrl, "cell_id": "k1"}
    ctx = SampleContext(mixture={pt.TASK: 1.0}, budget=TokenBudget(max_tokens=4096))
    for kind, want in (("CRISPRi", "CRISPRi knockdown of KLF1"), (None, "KLF1")):
        r = pt.perturbation_sample(ctrl, pert, ("KLF1",), "train", 0, ctx, Counts(), kind)
        assert want in r["prompt"] and "K562 cell" in r["prompt"]
        assert (kind is None) == ("CRISPRi" not in r["prompt"])
    # every template over every kind and the whole CL vocabulary as the file's cell type
    spec = templates.load(pt.TASK)
    seen = {"checked": 0, "before_label": 0}
    bad = []
    kinds = [None, *sorted(set(KIND_PHRASES))]
    for i, ct in enumerate([None, *vocab()["cell_type"]]):
        values = {"organism_name": "Homo sapiens", "cell_kind": cell_kind(ct), "num_genes": 3,
                  "cell_sentence": "ACTB HLA-A NKX2-1", "perturbed_sentence": "ACTB NKX2-1",
                  **words(("KLF1", "HLA-A")[: 1 + i % 2], kinds[i % len(kinds)])}
        for p in spec["prompts"]:
            text = templates.fill(p, values)
            bad += [f"{x}: {ct!r}" for x in problems(text, values["cell_kind"], seen) + text_problems(text, values["cell_kind"])]
        bad += text_problems(templates.fill(spec["response"], values))
    assert not bad, bad[:20]
    assert seen["checked"] > 0.8 * seen["before_label"] > 0, seen
