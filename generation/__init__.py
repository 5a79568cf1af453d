"""The model-side tools that write text with a trained model: cells generated back as expression
(generate) and a user's own cells annotated (annotate), over one batched generator."""
