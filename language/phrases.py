"""English around labels: indefinite articles, nouns a label already ends with, multi-valued labels, gene pairs.

Templates (templates/<task>.json) name these through format specs, so the wording stays data:

- `{tissue:a}` puts "a" or "an" before the value ("an adipose tissue", "a T cell");
- `{tissue:+tissue}` appends the noun unless the value already ends with it ("lung tissue", "adipose
  tissue", never "adipose tissue tissue"); both combine: `{tissue:a+tissue}`.

The article follows the first sound as said aloud, from the first word (`article`):

1. a word listed in `ARTICLE_EXCEPTIONS` (silent h: "an hour"; "un-" negations of "uni-" words: "an
   uninfected"; acronyms said as words: "a NASH") takes the listed article;
2. a number takes "an" when said with a vowel first: 8..., 11, 18 (and 11 or 18 thousand, million...);
3. a word read letter by letter (one letter: "T cell", "L2/3"; a capital after the first letter: "NK", "IgA",
   "mRNA"; a short capitalised word without vowels: "Fc", "Hb") takes "an" when its first letter's name starts
   with a vowel (A E F H I L M N O R S X: "an NK cell", "an L2/3 neuron", "a T cell", "a UV cell");
4. any other word takes "an" before a, e, i, o, and before u unless said "you" (u + one consonant + vowel,
   or "utr": "a uterine", "a unipolar", but "an un-" before a, e, o, u: "an unusual"); "a" before eu/ew
   ("a eukaryotic"), "one" ("a one-cell"), y + vowel ("a yolk") and every other consonant ("a hepatocyte").

Multi-valued labels (the Census joins several diseases with " || ") are written in words: "COVID-19 and
influenza", "a, b and c" (`in_words`). Gene pairs are written "HLA-A and KIR2DL1": symbols hold hyphens but
never spaces (language/symbols.py), so " and " and "; " split them back unambiguously (`parse_pairs`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

ARTICLE_EXCEPTIONS: Mapping[str, str] = {
    # silent h
    **dict.fromkeys(("hour", "hours", "hourly", "honest", "honor", "honour", "honorary", "heir"), "an"),
    # "un-" + a word that starts "i": not the "uni-" (you-) prefix
    **dict.fromkeys(("unidentified", "uninfected", "uninjured", "uninvolved", "unimmunized", "uninflamed",
                     "unirradiated", "unimpaired", "uninformative", "unindexed", "uninduced", "unintended"), "an"),
    # acronyms said as words, whose first letter's name starts with a vowel
    **dict.fromkeys(("nash", "sars", "mers", "melas", "merrf", "mody", "lada", "hellp", "leopard", "ficus", "scid",
                     "sapho", "sunct", "narp", "midas"), "a"),
}
VOWEL_LETTER_NAMES = frozenset("AEFHILMNORSX")  # "ay", "ee", "ef", "aitch", "eye", "el", "em", "en", "oh", ...
_FIRST = re.compile(r"[A-Za-z0-9']+")
_YOU = re.compile(r"u(?:[bcdfgjklmnpqrstvwxz][aeiouy]|tr)")
_UN_NEGATION = re.compile(r"un[aeou]")
_PAIR_AND = " and "
_PAIR_SEP = "; "


@lru_cache(maxsize=1 << 16)
def article(phrase: str) -> str:
    """ "a" or "an" for a phrase, by the sound its first word starts with (the rules in the module doc)."""
    m = _FIRST.match(phrase.strip())
    if not m:
        return "a"
    word = m.group(0).strip("'")
    low = word.lower()
    if low in ARTICLE_EXCEPTIONS:
        return ARTICLE_EXCEPTIONS[low]
    if word[:1].isdigit():
        digits = re.match(r"\d+", word).group(0)
        spoken_vowel = digits[0] == "8" or (digits[:2] in ("11", "18") and len(digits) % 3 == 2)
        return "an" if spoken_vowel else "a"
    if _letter_by_letter(word):
        return "an" if word[0].upper() in VOWEL_LETTER_NAMES else "a"
    return "an" if _vowel_sound(low) else "a"


def _letter_by_letter(word: str) -> bool:
    """Whether a word is said as letters: one letter (with digits), a capital after the first letter, or a
    short capitalised word without vowels."""
    letters = re.match(r"[A-Za-z]+", word)
    if not letters:
        return False
    head = letters.group(0)
    if len(head) == 1:
        return True
    if any(c.isupper() for c in head[1:]):
        return True
    return head[0].isupper() and len(head) <= 2 and not any(c in "aeiou" for c in head[1:].lower())


def _vowel_sound(low: str) -> bool:
    """Whether an ordinary word starts with a vowel sound."""
    first = low[0]
    if first in "ai":
        return True
    if first == "e":
        return not low.startswith(("eu", "ew"))
    if first == "o":
        return not (low == "one" or low.startswith(("one-", "once")))
    if first == "u":
        return not _YOU.match(low) or bool(_UN_NEGATION.match(low))
    if first == "y":
        return len(low) > 1 and low[1] not in "aeiou"
    return False


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def with_noun(phrase: str, noun: str) -> str:
    """The phrase ending with `noun`: appended unless the phrase's last word already is it (or its plural)."""
    last = phrase.rsplit(None, 1)[-1].lower() if phrase.strip() else ""
    return phrase if last in (noun.lower(), noun.lower() + "s") else f"{phrase} {noun}"


@lru_cache(maxsize=1 << 16)
def in_words(label: str) -> str:
    """A label as running text: several values (" || ") joined "a and b" / "a, b and c"; whitespace runs made
    single and a trailing ; , or . dropped (a sentence's own punctuation follows)."""
    parts = [" ".join(p.split()).rstrip(";,. ") for p in str(label).split("||")]
    return join_words([p for p in parts if p])


def join_words(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return items[0] if items else ""
    return f"{', '.join(items[:-1])} and {items[-1]}"


_SPEC = re.compile(r"(?P<a>a)?(?:\+(?P<noun>[A-Za-z]+))?")


def check_spec(spec: str) -> bool:
    """Whether a template's format spec is one this module fills (see the module doc)."""
    return bool(_SPEC.fullmatch(spec))


def apply_spec(value, spec: str) -> str:
    """A value formatted by a template spec: '' (as is), 'a', '+noun' or 'a+noun'."""
    text = str(value)
    if not spec:
        return text
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"unknown template spec {spec!r} (a, +noun or a+noun)")
    if m["noun"]:
        text = with_noun(text, m["noun"])
    return with_article(text) if m["a"] else text


@lru_cache(maxsize=1 << 16)
def cell_kind(cell_type: str | None) -> str:
    """A cell type as a noun phrase ("a Homo sapiens <kind>"): a missing or unknown one is "cell of unknown
    type"; a one-word name with a digit or in capitals (a cell line: K562, HepG2) gets "cell" after it."""
    text = in_words(cell_type) if cell_type is not None else ""
    if not text or text.lower() in ("unknown", "na", "nan", "none"):
        return "cell" if cell_type is None else "cell of unknown type"
    if " " not in text and (any(c.isdigit() for c in text) or text.isupper()):
        return f"{text} cell"
    return text


def format_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    """Gene pairs as an answer: 'HLA-A and KIR2DL1; NKX2-1 and FOXA1'."""
    return _PAIR_SEP.join(f"{a}{_PAIR_AND}{b}" for a, b in pairs)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The pairs of `format_pairs`' text (a completion's bare answer); ValueError on anything else."""
    out = []
    for item in text.split(_PAIR_SEP):
        a, sep, b = item.partition(_PAIR_AND)
        if not sep or not a or not b or " " in a or " " in b:
            raise ValueError(f"not a gene pair 'A and B': {item!r}")
        out.append((a, b))
    return out


def format_lr(pairs: Iterable[tuple[str, int, str, int]]) -> str:
    """Ligand-receptor answers: 'CD74 (cell 1) -> MIF (cell 2); ...' (names hold no spaces)."""
    return _PAIR_SEP.join(f"{a} (cell {i}) -> {b} (cell {j})" for a, i, b, j in pairs)


_LR_ITEM = re.compile(r"(\S+) \(cell (\d+)\) -> (\S+) \(cell (\d+)\)")


def parse_lr(text: str) -> list[tuple[str, int, str, int]]:
    """The pairs of `format_lr`' text; ValueError on anything else."""
    out = []
    for item in text.split(_PAIR_SEP):
        m = _LR_ITEM.fullmatch(item)
        if m is None:
            raise ValueError(f"not a ligand-receptor item 'L (cell i) -> R (cell j)': {item!r}")
        out.append((m[1], int(m[2]), m[3], int(m[4])))
    return out
