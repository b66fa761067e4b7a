"""Shared fixtures: the digits as shards (real images that ship with scikit-learn)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shards.digits import write_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def launch(args: list[str], cwd: Path, processes: int = 1, timeout: int = 600, port: int = 0) -> subprocess.CompletedProcess:
    """Run harness/run.py under `accelerate launch` with N CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --multi_gpu is accelerate's name for its torchrun launcher; without it a CPU host runs 1 process
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port or _free_port()), str(ROOT / "harness" / "run.py"), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-8000:], sep="\n")
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
