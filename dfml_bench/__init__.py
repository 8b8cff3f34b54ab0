"""dfml-bench: benchmark and reproduction suite for data-free meta-learning."""

__version__ = "0.1.0"
