"""Studies: one module per research question, each run as ``python -m studies.<name>``."""
