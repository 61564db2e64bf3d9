"""SDTT distillation on the training engine: options, objective, teacher, task (docs/pgm-algorithm.md, section 8)."""
