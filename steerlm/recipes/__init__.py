"""The recipes: one Hydra entry point per stage, each `<name>.py` with a `main()` and its config in `steerlm/conf/`.

Run one as `steerlm <name> key=value ...` (the installed console command, `steerlm.cli`) or, in a checkout,
`python recipes/<name>.py key=value ...` (`recipes/` at the repository root links here).
"""
