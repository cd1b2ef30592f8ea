"""`pip install .` (not editable) ships every recipe and Hydra config: `steerlm <recipe>` runs from anywhere.

The slow test installs a copy of this working tree into a fresh virtual environment that reuses the running
environment's dependencies (a `.pth` line; no downloads), deletes the copy, and runs the installed command from
an unrelated directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from steerlm import cli
from steerlm.config.store import CONF_DIR, RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {".git", ".venv", "runs", "data", "build", "outputs", ".pytest_cache"}  # at the repository root


def test_cli_knows_exactly_the_recipes_in_recipes_dir():
    on_disk = {path.stem for path in (ROOT / "recipes").glob("*.py") if not path.stem.startswith("_")}
    assert set(cli.recipes()) == on_disk
    assert all(cli.recipes().values()), "every recipe has a docstring whose first line the CLI lists"


def test_root_conf_and_recipes_link_to_the_package():
    assert (ROOT / "conf").resolve() == CONF_DIR == ROOT / "steerlm" / "conf"
    assert (ROOT / "recipes").resolve() == RECIPES_DIR == cli.RECIPES_DIR == ROOT / "steerlm" / "recipes"


def test_help_lists_recipes_and_unknown_names_fail(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, summary in cli.recipes().items():
        assert f"  {name} " in out and summary in out
    assert "launch" in out
    assert cli.main(["trian_sft"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'trian_sft'" in err and "train_sft" in err and "demo" in err
    assert cli.main([]) == 2 and "usage: steerlm RECIPE" in capsys.readouterr().err


def _copy_ignoring(directory: str, names: list[str]) -> set[str]:
    skip = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
    return skip | (NOT_SHIPPED & set(names) if Path(directory) == ROOT else set())


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_pip_install_runs_recipes_from_any_directory(tmp_path):
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_copy_ignoring)  # the build writes build/ and *.egg-info here
    work.mkdir()
    # The checkout must not leak in: no PYTHONPATH, no editable finder (.pth files on a .pth line are not read).
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", PYTHONNOUSERSITE="1")

    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work, env).stdout.strip()
    )
    dependencies = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (purelib / "_steerlm_test_dependencies.pth").write_text("\n".join(dict.fromkeys(dependencies)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation"]
    # --ignore-installed: pip leaves alone a steerlm installed where the dependencies come from (editable or not)
    _run([*pip, "--ignore-installed", "--no-index", "--no-cache-dir", "--quiet", str(src)], tmp_path, env)
    shutil.rmtree(src)

    where = _run([str(python), "-c", "import steerlm; print(steerlm.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    installed_conf = purelib / "steerlm" / "conf"
    assert sorted(p.relative_to(installed_conf) for p in installed_conf.rglob("*.yaml")) == sorted(
        p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml")
    )

    steerlm = str(venv / "bin" / "steerlm")
    listing = _run([steerlm, "--help"], work, env).stdout
    assert all(f"  {name} " in listing for name in cli.recipes())
    assert "Demo on the embedded default" in listing

    steps = ["trainer.max_steps=3", "trainer.eval_interval=3", "checkpoint.save_interval=null"]
    _run([steerlm, "demo", *steps, "output_dir=out"], work, env)
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["last_step"] == 3 and math.isfinite(summary["final_valid_loss"])
    assert summary["final_valid_loss"] < summary["initial_valid_loss"]
    assert "name: tiny" in (work / "out" / "config.yaml").read_text()  # conf/model/tiny.yaml, from the package

    launch = _run([steerlm, "launch", "demo", "parallel=tp2"], work, env).stdout
    assert f"cd {work}" in launch and str(purelib / "steerlm" / "recipes" / "demo.py") in launch
