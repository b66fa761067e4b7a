"""The environment a run needs: nothing compiled at start-up."""
import os
from pathlib import Path

from conftest import launch, tiny_recipe

COMPILERS = ("cc", "gcc", "g++", "c++", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-g++", "clang", "clang++", "ninja")


def test_a_zero2_run_on_cpu_compiles_nothing(work, digits, tmp_path):
    """No JIT-built DeepSpeed op (deepspeed_shm_comm): no compiler run, nothing in TORCH_EXTENSIONS_DIR.

    Every compiler and ninja on PATH is replaced by one that records its call and fails, and the
    extensions cache is a fresh, empty folder: a build would fail the run or leave files there.
    """
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "compiler-calls"
    for name in COMPILERS:
        (fake / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\nexit 1\n')
        (fake / name).chmod(0o755)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    recipe = tiny_recipe(work, digits, "no-compile", schedule={"epochs": 1}, runtime={"zero_stage": 2})
    result = launch([str(recipe)], cwd=work, processes=2,
                    env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 0
    assert not calls.exists(), calls.read_text()
    assert list(extensions.iterdir()) == []
    assert (Path(work) / "no-compile" / "summary.json").is_file()
