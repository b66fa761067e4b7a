"""The environment a run needs: the DeepSpeed version it was tested on, and nothing compiled at start-up."""
import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

from conftest import ROOT, launch, tiny_recipe

from harness import run, zero

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


def test_an_untested_deepspeed_is_refused_before_anything_starts(work, digits, monkeypatch, capsys):
    recipe = tiny_recipe(work, digits, "untested-deepspeed")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0" if name == "deepspeed" else real(name))
    assert run.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed 0.20.0 is installed" in err and "0.19.8" in err and "constraints.txt" in err
    assert "Traceback" not in err and not (work / "untested-deepspeed").exists()


def test_the_package_metadata_and_constraints_pin_the_tested_deepspeed():
    """pyproject.toml allows exactly harness.zero.SUPPORTED_DEEPSPEED; constraints.txt is what is installed."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (deepspeed,) = [r for r in requirements if re.match(r"deepspeed\b", r)]
    assert set(re.findall(r"==\s*([\w.]+)", deepspeed)) == set(zero.SUPPORTED_DEEPSPEED), deepspeed
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split("\n")
                if line and not line.startswith("#"))
    assert pins["deepspeed"] in zero.SUPPORTED_DEEPSPEED
    assert {name: importlib.metadata.version(name) for name in pins} == pins


def test_the_process_group_module_imports_nothing_of_deepspeed():
    """harness.distributed makes the process group; DeepSpeed is joined by harness.zero, which imports it, not the reverse."""
    import subprocess
    import sys

    check = ("import harness.distributed, sys; "
             "assert 'deepspeed' not in sys.modules and 'harness.zero' not in sys.modules, "
             "sorted(m for m in sys.modules if 'deepspeed' in m or m == 'harness.zero')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_rank_and_world_come_from_the_launcher_before_the_process_group(monkeypatch):
    from harness.distributed import rank_and_world

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert rank_and_world() == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate's / torchrun's, ahead of SLURM's
    assert rank_and_world() == (1, 2)
