"""A driving world model: frame tokenizer, transformer dynamics, and the data they learn from."""

__version__ = "0.1.0"
