"""aitraining: distill a large causal language model (teacher) into a smaller one (student)."""

__version__ = "0.1.0"
