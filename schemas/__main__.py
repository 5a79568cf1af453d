"""`python -m schemas` prints docs/SCHEMAS.md."""

from schemas.tables import markdown

print(markdown(), end="")
