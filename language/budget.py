"""Token budget: how many genes per cell sentence fit in --max-tokens, and est_tokens of a sample.

With --tokenizer (a tokenizer.json or a Hugging Face tokenizer folder), gene and text tokens are counted
exactly, gene by gene (" SYMBOL", as in a sentence) and text by text (cached). Without one the estimates
are documented constants: 3.3 tokens per gene (GPT-NeoX/Pythia on common symbols; ~4.4 for arbitrary HGNC
symbols) and 4 characters per token for English text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from schemas.errors import InputError
from schemas.extras import require

TOKENS_PER_GENE = 3.3
CHARS_PER_TOKEN = 4.0


def load_tokenizer_json(path: str) -> str:
    """The serialized tokenizer (tokenizers JSON) from a tokenizer.json file or a folder holding one."""
    p = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise InputError(f"--tokenizer {path!r}: no tokenizer.json there (give a file or a Hugging Face folder)")
    with open(p, encoding="utf-8") as f:
        text = f.read()
    tokenizer_class = require("tokenizers", f"--tokenizer {path!r} (exact token budgets)").Tokenizer
    try:
        tokenizer_class.from_str(text)
    except Exception as e:
        raise InputError(f"--tokenizer {p!r} is not a tokenizers JSON file: {e}") from e
    return text


@dataclass
class TokenBudget:
    max_tokens: int = 1024
    tokens_per_gene: float = TOKENS_PER_GENE
    chars_per_token: float = CHARS_PER_TOKEN
    tokenizer_json: str | None = None  # plain text, so the budget pickles to Spark workers
    _tok: object = field(default=None, repr=False, compare=False)
    _gene: dict = field(default_factory=dict, repr=False, compare=False)
    _text: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None, "_gene": {}, "_text": {}}

    def _tokenizer(self):
        if self._tok is None:
            self._tok = require("tokenizers", "an exact token budget").Tokenizer.from_str(self.tokenizer_json)
        return self._tok

    @property
    def exact(self) -> bool:
        return self.tokenizer_json is not None

    def text(self, s: str) -> int:
        if not s:
            return 0
        if not self.exact:
            return math.ceil(len(s) / self.chars_per_token)
        n = self._text.get(s)
        if n is None:
            n = len(self._tokenizer().encode(s, add_special_tokens=False).ids)
            if len(self._text) < 200_000:
                self._text[s] = n
        return n

    def gene(self, symbol: str) -> float:
        if not self.exact:
            return self.tokens_per_gene
        n = self._gene.get(symbol)
        if n is None:
            n = self._gene[symbol] = len(self._tokenizer().encode(" " + symbol, add_special_tokens=False).ids)
        return n

    def genes(self, genes: list[str]) -> float:
        return sum(self.gene(g) for g in genes) if self.exact else len(genes) * self.tokens_per_gene

    def fit(self, sentences: list[list[str]], fixed: int, cap: int) -> int:
        """Most genes n (≤ cap) such that the first n genes of every sentence, plus `fixed` tokens, fit."""
        avail = self.max_tokens - fixed
        if avail <= 0 or not sentences:
            return 0
        longest = min(cap, max(len(s) for s in sentences))
        if not self.exact:
            # a sentence shorter than n contributes its own length
            lo, hi = 0, longest
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if sum(min(mid, len(s)) for s in sentences) * self.tokens_per_gene <= avail:
                    lo = mid
                else:
                    hi = mid - 1
            return lo
        cum = []
        for s in sentences:
            c, acc = [0.0], 0.0
            for g in s[:longest]:
                acc += self.gene(g)
                c.append(acc)
            cum.append(c)
        lo, hi = 0, longest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(c[min(mid, len(c) - 1)] for c in cum) <= avail:
                lo = mid
            else:
                hi = mid - 1
        return lo


def genes_cap(budget: TokenBudget, cap: int = 1024) -> int:
    """The most genes of a cell any prompt can show (a gene costs at least one token, or the estimate): gene
    lists are cut to this before the shuffle, so it moves no gene a prompt could never hold."""
    return min(cap, budget.max_tokens if budget.exact else int(budget.max_tokens / budget.tokens_per_gene) + 1)
