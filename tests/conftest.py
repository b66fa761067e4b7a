"""Shared fixtures: the digits as shards (real images that ship with scikit-learn)."""
import os
import subprocess
import sys
from pathlib import Path

import json

import pytest
import yaml

from shards.digits import write_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch_command(args: list[str], processes: int = 1, machines: int = 1, machine_rank: int = 0,
                   port: int = 0) -> list[str]:
    """`accelerate launch` of harness/run.py: N CPU processes in all, over M "machines"."""
    # --multi_gpu is accelerate's name for its torchrun launcher; without it a CPU host runs 1 process
    multi = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
            "--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or _free_port()),
            str(ROOT / "harness" / "run.py"), *args]


def launch(args: list[str], cwd: Path, processes: int = 1, timeout: int = 600,
           file_size_limit: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run harness/run.py under `accelerate launch` with N CPU processes on this host.

    ``file_size_limit`` (bytes) makes writing any larger file fail with EFBIG, as a full disk
    would (Python ignores SIGXFSZ, so the write raises instead of killing the process).
    ``env`` adds or replaces environment variables of the launch.
    """
    cmd = launch_command(args, processes)

    def limit_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    result = subprocess.run(cmd, cwd=cwd, env={**LAUNCH_ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout, preexec_fn=limit_files if file_size_limit else None)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-8000:], sep="\n")
    return result


def run_nodes(commands: list[list[str]], logs: list[Path], cwd: Path, marker: str, timeout: float = 600) -> list[int]:
    """Run one launcher per "node" side by side, each logging to its file; their exit statuses.

    Logs go to files, not pipes (a pipe read only after the other node ends can fill and block).
    If a node fails, the others are stopped after a grace period instead of waiting out the
    collective timeout; if the timeout passes, every rank first dumps its threads' stacks
    (SIGUSR2, see harness/run.py) into the logs, so a hang shows where each rank waits.
    ``marker`` is a string in every command line of this run (its output directory): torchrun
    starts ranks in sessions of their own, so they are found by it, not by process group.
    """
    import time

    nodes = []
    for command, log in zip(commands, logs):
        with log.open("w") as sink:
            nodes.append(subprocess.Popen(command, cwd=cwd, env=LAUNCH_ENV, stdout=sink, stderr=subprocess.STDOUT))
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(n.poll() is None for n in nodes):
            now = time.monotonic()
            if failed_at is None and any(n.returncode not in (None, 0) for n in nodes):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + 60):
                subprocess.run(["pkill", "-USR2", "-f", rf"-u \S*harness/run\.py .*{marker}"], check=False)
                time.sleep(3)
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", marker], check=False)
        for n in nodes:
            n.wait()
    return [n.returncode for n in nodes]


def processes(*needles: str) -> dict[int, dict[str, str]]:
    """Processes on this host whose command line holds every one of ``needles``: pid -> environment."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if not all(needle in cmdline for needle in needles):
                continue
            env = dict(v.split("=", 1) for v in (proc / "environ").read_bytes().decode().split("\0") if "=" in v)
        except (OSError, ValueError):  # gone meanwhile, or not a process directory
            continue
        found[int(proc.name)] = env
    return found


def rank_pids(marker: str) -> dict[int, int]:
    """Training processes (torchrun's workers: they have LOCAL_RANK) whose command line holds ``marker``: rank -> pid."""
    return {int(env["RANK"]): pid for pid, env in processes(marker, "harness/run.py").items() if "LOCAL_RANK" in env}


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0) -> None:
    """Return once ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_recipe(tmp: Path, digits: Path, name: str, **sections) -> Path:
    tree = {
        "output": str(tmp / name),
        "data": {"train": str(digits / "train"), "val": str(digits / "val"),
                 "num_classes": 10, "image_size": 16, "crop_pct": 1.0, "batch_size": 32, "workers": 1,
                 "shuffle_buffer": 200, "augment": {"crop_scale": [0.7, 1.0], "hflip": 0.0}},
        "student": {"model": "test_resnet"},
        "method": {"name": "supervised"},
        "optim": {"lr": 0.1, "weight_decay": 5.0e-4},
        "schedule": {"epochs": 4, "name": "cosine"},
        "runtime": {"log_every": 5},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def records(run: Path, kind: str) -> list[dict]:
    """The records of one kind in a run's metrics.jsonl."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def teacher(work, digits) -> Path:
    """A real teacher: test_resnet trained on the digits by the `supervised` method."""
    result = launch([str(tiny_recipe(work, digits, "teacher"))], cwd=work)
    assert result.returncode == 0
    assert summary(work / "teacher")["student"]["top1"] > 0.9
    return work / "teacher" / "student.safetensors"




# --- the quick tier (`make test-quick`): tests that start no training processes

_SPAWNS = ("launch(", "launch_command(", "run_nodes(", "accelerate.commands.launch", "sbatch", "--slurm",
           "subprocess.Popen(", "mp.spawn(")


def _spawns(function, seen: set) -> bool:
    """Whether a test or fixture function, or a function of its module that it calls, starts processes."""
    import inspect
    import re

    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(call in source for call in _SPAWNS):
        return True
    module = inspect.getmodule(function)
    called = (getattr(module, name, None) for name in set(re.findall(r"\b([A-Za-z_]\w*)\(", source)))
    return any(inspect.isfunction(f) and f.__module__ == module.__name__ and _spawns(f, seen) for f in called)


def pytest_collection_modifyitems(config, items):
    """Mark every test that launches training processes, itself or through a fixture, as `launches`.

    `make test-quick` deselects them (`-m "not launches"`): the unit tier, for iteration; `make
    test` (what CI runs) keeps all. Read from the source, so a new test is classed with no marker
    to remember; a test that starts processes inside another module (a benchmark's own spawn)
    carries ``@pytest.mark.launches`` itself.
    """
    for item in items:
        seen: set = set()
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            functions += [d.func for d in defs]
        if any(f is not None and _spawns(f, seen) for f in functions):
            item.add_marker(pytest.mark.launches)
