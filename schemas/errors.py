"""The error types every entry point (corpus builder, trainer) treats as the user's: one line, exit status 2.

A message names the input (file, column, option, corpus) and says what to do; a traceback is only shown with
`--log-level debug`. Anything else that escapes is a bug or an environment failure (exit 1).
"""


class InputError(ValueError):
    """Bad input, with a message that names the input (file, URI, column, organism, option) and what to do."""


class ConfigError(InputError):
    """A bad option value or config file; the message names the option (flag or YAML key) and the value."""


class CorpusError(InputError):
    """A corpus that cannot be read or used as asked (missing, damaged, lacking a task or split, bad data
    options); the message names the corpus, task, split or file."""


class ModelError(InputError):
    """A model, tokenizer or model option that cannot be used; the message names it and says what is wrong."""
