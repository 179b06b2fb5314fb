"""How mixquant-tiny was made: its tokenizer builder, training script and the measurements taken along the way.

Not part of the installed package (only mixquant/ is); run from the repository root, e.g.
`python -m training.train`. See training/README.md.
"""
