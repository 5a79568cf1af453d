"""Reference knowledge joined into the sample corpus: one module per source format, each a parser to an
Arrow table declared in `schemas/` (BioGRID TAB3, CellPhoneDB v5, PubMed MEDLINE/XML, GMT gene sets)."""

TAXIDS: dict[str, int] = {
    "homo_sapiens": 9606,
    "mus_musculus": 10090,
    "macaca_mulatta": 9544,
    "callithrix_jacchus": 9483,
    "pan_troglodytes": 9598,
}
