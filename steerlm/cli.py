"""`steerlm RECIPE [key=value ...]`: every recipe, and the launchers, as one installed console command.

    steerlm demo trainer.max_steps=3                   # = python recipes/demo.py trainer.max_steps=3
    steerlm train_sft output_dir=runs/sft --cfg job    # Hydra's own flags pass through
    steerlm launch demo parallel=tp2 cluster=slurm     # = python -m launchers demo ...
    torchrun --nproc-per-node 2 -m steerlm.recipes.demo parallel=tp2

The recipes (`steerlm/recipes/`) and their Hydra configs (`steerlm/conf/`) are part of the package, so this
works from any directory after `pip install .`; outputs land relative to the current directory. `steerlm` or
`steerlm --help` lists the recipes; an unknown name is an error (exit status 2) naming the choices.
"""

from __future__ import annotations

import ast
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import steerlm.recipes

RECIPES_DIR = Path(steerlm.recipes.__file__).resolve().parent
LAUNCH = "launch"
LAUNCH_SUMMARY = "Render (the default) or --submit a recipe or --pipeline as a torchrun command or Slurm job."


def recipes() -> dict[str, str]:
    """Recipe name → the first line of its docstring, read without importing the recipe (torch is slow)."""
    found = {}
    for path in sorted(RECIPES_DIR.glob("*.py")):
        if not path.stem.startswith("_"):
            doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
            found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def usage(known: dict[str, str]) -> str:
    commands = {**known, LAUNCH: LAUNCH_SUMMARY}
    width = max(map(len, commands)) + 2
    lines = [
        "usage: steerlm RECIPE [key=value ...]",
        "       steerlm launch RECIPE [key=value ...] [--submit]   (python -m launchers; `steerlm launch --help`)",
        "",
        "Runs a recipe with its packaged Hydra config; key=value overrides and Hydra flags (--cfg job, --help)",
        "pass through. Recipes:",
        "",
        *(f"  {name:<{width}}{summary}" for name, summary in commands.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    known = recipes()
    if not args or args[0] in ("-h", "--help", "help"):
        (sys.stdout if args else sys.stderr).write(usage(known))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == LAUNCH:
        from launchers.cli import main as launch

        return launch(rest)
    if name not in known:
        choices = ", ".join([*known, LAUNCH])
        sys.stderr.write(f"steerlm: unknown recipe {name!r}; choose one of: {choices} (steerlm --help)\n")
        return 2
    # Exactly `python recipes/<name>.py ...`: Hydra reads the overrides from sys.argv and finds `../conf` next to
    # the recipe's file (imported as a module it would look for a `steerlm.conf` package instead).
    script = str(RECIPES_DIR / f"{name}.py")
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
