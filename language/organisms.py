"""The organisms a corpus can hold: their Census names, the words prompts use, and the aliases users type."""

from __future__ import annotations

from schemas.errors import InputError

ORGANISMS: dict[str, str] = {
    "homo_sapiens": "Homo sapiens",
    "mus_musculus": "Mus musculus",
    "macaca_mulatta": "Macaca mulatta",
    "callithrix_jacchus": "Callithrix jacchus",
    "pan_troglodytes": "Pan troglodytes",
}
_ALIASES = {"human": "homo_sapiens", "mouse": "mus_musculus", "rhesus": "macaca_mulatta",
            "marmoset": "callithrix_jacchus", "chimpanzee": "pan_troglodytes"}


def normalise_organism(name: str) -> str:
    """'Homo sapiens', 'homo_sapiens', 'human' -> 'homo_sapiens'; anything else is an InputError."""
    key = name.strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in ORGANISMS:
        raise InputError(f"unknown organism {name!r}; known: {', '.join(ORGANISMS)} (or human, mouse)")
    return key
