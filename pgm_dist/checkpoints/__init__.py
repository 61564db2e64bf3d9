"""Checkpoints: the folder format, saving during a run, universal resumes, loading a model without DeepSpeed."""
