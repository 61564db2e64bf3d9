"""Evaluation maths shared by training, distillation and the evaluate command."""
