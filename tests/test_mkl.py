"""MKL's strict reproducibility mode (`parallel.cpu_reproducible`, `steerlm.runtime.mkl`).

MKL reads MKL_CBWR once per process, so every case runs in a fresh interpreter, with the variable the test
session itself runs under (conftest sets it) taken out of its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from steerlm.config import compose, register_schemas
from steerlm.config.store import RECIPES_DIR
from steerlm.runtime import mkl

pytestmark = pytest.mark.skipif(mkl.mode() is None, reason="this torch computes its products without MKL")

# A product whose reduction (4,096 long) MKL's default code paths split over the threads it has.
PRODUCT = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    from steerlm.runtime import mkl

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if sys.argv[1] == "matmul-first":
        torch.ones(8, 8) @ torch.ones(8, 8)
    line = mkl.request(sys.argv[2] == "strict")
    a, b = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0)), torch.randn(4096, 256)
    products = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        products.append(a @ b)
    print(json.dumps({"mode": mkl.mode(), "line": line, "equal": torch.equal(*products)}))
    """
)


def run(*args: str, **env: str) -> tuple[dict, str]:
    environment = {key: value for key, value in os.environ.items() if key != mkl.VARIABLE} | env
    done = subprocess.run(
        [sys.executable, "-c", PRODUCT, *args], capture_output=True, text=True, env=environment, check=True
    )
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_strict_mode_makes_a_long_products_result_independent_of_the_thread_count() -> None:
    default, _ = run("request", "default")
    if default["equal"]:
        pytest.skip("this CPU's MKL computes the product alike at 1 and 2 threads even without strict mode")
    assert not mkl.is_strict(default["mode"]) and "without strict" in default["line"]
    strict, warnings = run("request", "strict")
    assert strict["equal"], "strict mode left the product depending on the thread count"
    assert mkl.is_strict(strict["mode"]) and strict["line"] == "MKL strict reproducibility (MKL_CBWR=AUTO,STRICT)"
    assert warnings == ""


def test_a_users_mkl_cbwr_is_kept() -> None:
    kept, _ = run("request", "strict", MKL_CBWR="COMPATIBLE")
    assert not mkl.is_strict(kept["mode"]) and "MKL_CBWR=COMPATIBLE" in kept["line"]


def test_strict_mode_asked_for_after_mkl_ran_is_a_warning_naming_the_fix() -> None:
    late, warnings = run("matmul-first", "strict")
    assert not mkl.is_strict(late["mode"])
    assert "MKL had already run in this process" in warnings and "MKL_CBWR=AUTO,STRICT before starting" in warnings


def test_initialize_puts_the_process_and_its_children_in_strict_mode() -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys
        from steerlm import runtime
        from steerlm.config import ParallelConfig
        from steerlm.runtime import mkl
        runtime.initialize(ParallelConfig(cpu_reproducible=sys.argv[1] == "on"), 0)
        child = "from steerlm.runtime import mkl; print(mkl.mode())"
        print(mkl.mode(), subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
        runtime.shutdown()
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != mkl.VARIABLE}
    for setting, strict in (("on", True), ("off", False)):
        done = subprocess.run(
            [sys.executable, "-c", script, setting], capture_output=True, text=True, env=environment, check=True
        )
        modes = [int(value) for value in done.stdout.split()]
        assert [mkl.is_strict(value) for value in modes] == [strict, strict], (setting, modes)


# The recipes that build a model (pipeline and prepare_data run none themselves: the former's stages are these).
MODEL_RECIPES = sorted({path.stem for path in RECIPES_DIR.glob("*.py")} - {"__init__", "pipeline", "prepare_data"})


@pytest.mark.parametrize("recipe", MODEL_RECIPES)
def test_only_the_interactive_recipes_go_without_strict_mode(recipe: str) -> None:
    """Decoding one row at a time is where strict mode costs (~45 %): chat and serve; every other recipe's numbers
    must not depend on the threads it runs with."""
    register_schemas()
    assert compose(recipe, []).parallel.cpu_reproducible == (recipe not in ("chat", "serve"))


def test_the_session_runs_strict_as_the_recipes_do() -> None:
    """conftest asks for strict mode before any product, so in-process tests compute what recipes compute."""
    assert mkl.is_strict(mkl.mode())
