"""One module per stage: config → data → model → the training loop."""
