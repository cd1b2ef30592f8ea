"""Datasets and tokenisation (the bundled demo text for now)."""
