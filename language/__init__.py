"""The cell-sentence language, the ground floor that the corpus builder, the trainer and the model-side tools
share: how a cell's counts become a sentence (symbols, encoder, organisms), how a task asks and answers
(templates, phrases, token budget, prompts and their parsers), how ranks become expression again (inverse),
and how a corpus is read (corpus). It imports only the contracts (schemas/) and numeric libraries.
"""
