"""megatron-core imports without building its torch.compile wrappers up front (steerlm/_import_hooks.py)."""

from __future__ import annotations

import subprocess
import sys

from steerlm._import_hooks import lazy_compile


def test_lazy_compile_compiles_once_at_the_first_call_with_the_options() -> None:
    calls = []

    def real(fn, **options):
        calls.append(options)
        return lambda x: fn(x) + 100

    @lazy_compile(real)
    def double(x: int) -> int:
        return 2 * x

    factory = lazy_compile(real)(mode="max-autotune")
    triple = factory(lambda x: 3 * x)
    assert calls == [] and double.__name__ == "double"
    assert double(1) == 102 and double(2) == 104 and triple(1) == 103
    assert calls == [{}, {"mode": "max-autotune"}]


def test_megatron_core_imports_without_building_compile_wrappers_and_torch_compile_is_restored() -> None:
    probe = (
        "import sys, torch; real = torch.compile; calls = []\n"
        "def counting(*args, **kwargs): calls.append(1); return real(*args, **kwargs)\n"
        "torch.compile = counting; import steerlm, megatron.core\n"
        "from megatron.core.fusions import fused_bias_swiglu as f\n"
        "print(len(calls), torch.compile is counting, f.bias_swiglu.__wrapped__.__name__,"
        " any(type(x).__name__ == 'LazyCompileFinder' for x in sys.meta_path), 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["0", "True", "bias_swiglu", "False"]
    # what spares the import its cost: no torch._dynamo, unless torch's own modules that megatron-core imports load it
    # (torch 2.6's tensor parallelism does; 2.13's does not)
    torch_alone = "import sys, torch.distributed.tensor.parallel; print('torch._dynamo' in sys.modules)"
    baseline = subprocess.run([sys.executable, "-c", torch_alone], capture_output=True, text=True, check=True).stdout
    assert out[4] == baseline.strip()
