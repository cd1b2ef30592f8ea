"""Evaluation: attribute-model metrics (and, later, steerability against the synthetic oracle)."""
