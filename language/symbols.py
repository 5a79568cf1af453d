"""The one rule for turning var rows into the words cell sentences are written in.

A sentence is its gene words joined by single spaces and ended by "."; answers list genes separated by ", ".
So a word must hold no whitespace or control character, no "," or ";", and must not end in ".", ":", "," or
";" (the offline tokenizer splits those off a word). The rule, applied here and only here:

- a missing or blank symbol is replaced by the row's feature_id (counted: `missing`);
- whitespace, control characters, "," and ";" inside a symbol become "_", trailing ".,;:" are dropped, and the
  text is Unicode NFC-normalised (counted: `replaced`, symbols this changed); a symbol left empty takes the
  feature_id;
- upper-casing (cell2sentence's convention) can merge symbols that differ only by case (or by `ß`/`SS`):
  merged symbols share one token, their counts are summed, and the merges are counted (`merged_by_case`:
  distinct cleaned symbols that fell onto another one).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable

from schemas.errors import InputError

_BAD = re.compile(r"[\s,;\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]+")
_TRAILING = ".,;:"
COUNT_KEYS = ("missing", "replaced", "merged_by_case")


def clean(symbol: str) -> str:
    """`symbol` as a sentence word (may be empty): NFC, inner separators to "_", trailing punctuation off."""
    s = unicodedata.normalize("NFC", symbol).strip()
    s = _BAD.sub("_", s).strip("_")
    return s.rstrip(_TRAILING)


def _blank(name) -> bool:
    return name is None or (isinstance(name, float) and math.isnan(name)) or str(name).strip() == ""


def var_words(feature_ids: Iterable, feature_names: Iterable, *, uppercase: bool = True,
              source: str = "var") -> tuple[list[str], dict[str, int]]:
    """The word each var row is written as, and what the rule changed (see the module docstring).

    Raises InputError (naming `source`) when feature ids are not unique: two rows could not be told apart."""
    ids = [str(x) for x in feature_ids]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = [x for x in ids if x in seen or seen.add(x)]
        raise InputError(f"{source}: var feature ids are not unique ({len(dups)} repeated, e.g. {dups[:3]}); make "
                         "them unique (e.g. adata.var_names_make_unique()) or keep one row per feature")
    counts = dict.fromkeys(COUNT_KEYS, 0)
    words: list[str] = []
    by_upper: dict[str, set[str]] = {}
    for fid, name in zip(ids, feature_names, strict=True):
        if _blank(name):
            counts["missing"] += 1
            word = clean(fid) or fid
        else:
            raw = str(name)
            word = clean(raw)
            if word != raw.strip():
                counts["replaced"] += 1
            if not word:
                word = clean(fid) or fid
        if uppercase:
            up = word.upper()
            by_upper.setdefault(up, set()).add(word)
            word = up
        words.append(word)
    counts["merged_by_case"] = sum(len(v) - 1 for v in by_upper.values())
    return words, counts
