"""Every GPU figure of the documentation (docs/performance.md) from one command, on a bare GPU machine, in at most 8 minutes.

    python3 bench/gpu_suite.py OUT --wheels .whl     # a GPU machine (carry .whl: `make wheels` here)
    .venv/bin/python bench/gpu_suite.py OUT --cpu    # the same code paths, small: tests/test_gpu_suite.py

GPU time comes in short slices on machines that have torch, torchvision, timm and accelerate but
not DeepSpeed, webdataset or pydantic, so everything is prepared here and the run is one call:

1. **install**: ``--wheels DIR`` (filled by ``make wheels``, i.e. ``--make-wheels DIR``: every
   runtime dependency the bare machine lacks, for Python 3.12 manylinux x86-64, and the project's
   own wheel) is installed with pip into a private folder (``--no-index --no-deps --target``) that
   every part gets on ``PYTHONPATH``, after the working tree (the code measured is the tree's);
   then one process imports everything and checks each dependency's version against what its
   dependents require.
2. **shards**: ImageNet-like JPEGs of random, photo-like content (sides drawn from 256-400 px)
   written by ``shards.write`` as webdataset shards with ``_info.json``.
3. **figures**, each part in its own process with a time limit (a failure or hang is recorded and
   the rest runs), each beside the plain PyTorch loop measured in the same call:

   - the training step (``bench/step.py``) at ZeRO 0-3 in a world of one, teacher frozen (SimKD) and
     adapted (ATSC), ResNet-34 -> ResNet-18, batch 256, 224 px, bf16, eager; and compiled at
     stages 0-2 (``runtime.compile`` is refused at stage 3). Harness vs plain loop, images/s;
   - end to end (``bench/end_to_end.py``): ``harness/run.py`` on the generated shards, ATSC adapted,
     GPU decode, compiled, ZeRO-0: steady images/s and data-wait share, with the loader workers
     used; beside the plain compiled step on resident data (what the data path must feed);
   - the GPU data path alone (workers + decode, crop, resize, flip, normalise on the device, the
     loader ``bench/gpu_data.py`` measures), images/s on the same shards; beside the plain
     compiled step's consumption;
   - peak memory per ZeRO stage with ``recipes/imagenet-2teachers.yaml`` (``bench/zero_memory.py
     --recipe``, world of one), beside the plain loop over the same models at the same batch.

Parts run in priority order (install, shards, the compiled stage-0 step, end to end, data path,
eager steps, memory, compiled stages 1-2) inside ``--budget`` seconds: each gets at most its own cap
and never so much that the parts after it lose their minimum. ``OUT`` holds ``gpu_suite.json``
(every record, every part's status and time), ``gpu_suite.md`` (one table) and ``gpu_suite.log``
(each part's command and the end of its stderr), rewritten as results arrive: a run killed midway
leaves what it measured.

``--cpu`` (automatic without CUDA) runs the same parts with test_resnet models, 32 px images,
tiny batches and few steps; ``torch.compile`` there uses the ``aot_eager`` backend (dynamo and
AOTAutograd, the graphs inductor would compile, without its C++ code generation, which takes
minutes on a small CPU), as ``tests/test_engine.py`` does; end to end decodes on the CPU path,
which is the only one a process without CUDA may use; memory is bytes saved for backward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS, TABLE, LOG = "gpu_suite.json", "gpu_suite.md", "gpu_suite.log"
TWO_TEACHERS = "recipes/imagenet-2teachers.yaml"
BIG_TEACHER = ROOT / "bench" / "zero3_teacher.py"  # the ZeRO-3 big-teacher benchmark (issue 13, item 3)
BIG_TEACHER_STAGES = (0, 2, 3)

# ----------------------------------------------------------------------------- wheels

# The Python packages of the GPU machine's image (/work/.library/device/KINDS.md, "Python packages
# already there", read 2026-11-17; its Python is 3.12). Everything the project needs beyond these
# travels as wheels.
BARE_MACHINE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# Carried although the image has them: the version there is not known, and ours need a newer one.
FOR_VERSION = {"typing-extensions": "pydantic 2.14 and pydantic-core need typing-extensions >= 4.16"}

# The wheels `make wheels` fetches: every runtime dependency (transitively) not in BARE_MACHINE, plus
# FOR_VERSION; versions from constraints.txt. tests/test_gpu_suite.py recomputes the set from
# pyproject.toml and the installed packages' metadata.
CARRIED = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "typing-extensions", "webdataset", "braceexpand")
SOURCE_ONLY = frozenset({"deepspeed"})  # PyPI has no wheel of it: built here (pure Python, no op compiled)
PYTHON_TAG = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``name==version`` lines of constraints.txt, by canonical name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def wheel_commands(dest: Path, python: str = sys.executable,
                   pins: Optional[dict[str, str]] = None) -> list[list[str]]:
    """The pip commands that fill ``dest``: downloads for Python 3.12 manylinux x86-64, DeepSpeed
    built from its source release, and the project's own wheel (``--no-deps``: nothing else)."""
    pins = pins if pins is not None else pinned_versions()
    missing = [name for name in CARRIED if name not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}; add the versions CI ran "
                         f"(docs/getting-started.md, 'The environment') before `make wheels`")
    binary = [f"{name}=={pins[name]}" for name in CARRIED if name not in SOURCE_ONLY]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    commands = [[python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--python-version", PYTHON_TAG, "--implementation", "cp", *platforms, "-d", str(dest), *binary]]
    commands += [[python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), f"{name}=={pins[name]}"]
                 for name in CARRIED if name in SOURCE_ONLY]
    commands.append([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dest),
                     str(ROOT)])
    return commands


def make_wheels(dest: Path) -> list[Path]:
    """Fill ``dest`` with the wheels a bare GPU machine needs (see :data:`CARRIED`); needs the network."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two make the install on the machine fail
        old.unlink()
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed's ops are JIT-built when used; the harness uses none
    for command in wheel_commands(dest):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env=env, cwd=ROOT)
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' in-tree build folder
    wheels = sorted(dest.glob("*.whl"))
    names = {canonical(w.name.split("-")[0]) for w in wheels}
    for w in wheels:  # a compiled wheel for another Python than the GPU machine's would not import there
        tags = w.name[:-4].split("-")[-3:]
        if tags[0] not in ("py3", "py2.py3", "cp312") or not (tags[2] == "any" or tags[2].endswith("x86_64")):
            raise SystemExit(f"{w.name}: built for {'-'.join(tags)}, not Python 3.12 on x86-64; remove it and "
                             f"rerun `make wheels`")
    lacking = sorted(set(CARRIED) - names)
    if lacking:
        raise SystemExit(f"`make wheels` fetched no wheel for {', '.join(lacking)}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {dest}: carry it to the GPU machine "
          f"(docs/performance.md, 'GPU figures: one command')")
    return wheels


def install_command(wheels: Path, site: Path, python: str = sys.executable) -> list[str]:
    """pip's offline install of every wheel in ``wheels`` into the folder ``site`` (no dependency resolution)."""
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    return [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--disable-pip-version-check", "--target", str(site), *found]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Scale:
    """Sizes of one suite run: the GPU figures, or the CPU smoke test of the same code paths."""

    mode: str  # "gpu" or "cpu"
    student: str
    teacher: str
    batch: int
    size: int
    classes: int
    step_timing: tuple[int, int, int]  # warm-up steps, steps per round, rounds
    images: int  # train images generated
    val_images: int
    sides: tuple[int, int]  # JPEG sides drawn from this range
    e2e_batch: int
    e2e_epochs: int
    e2e_log_every: int
    decode: str  # end to end's data.decode
    memory_overrides: tuple[str, ...]  # applied to the two-teacher recipe
    data_epochs: int  # the data path's epochs: the last one is measured
    big_teacher: tuple[str, ...]  # bench/zero3_teacher.py's arguments (each stage run on its own)
    compiled_groups: tuple[tuple[int, ...], ...]  # ZeRO stages compiled together in one process
    caps: dict[str, float] = field(default_factory=dict)  # seconds per part
    compile_backend: Optional[str] = None  # None: torch.compile's default (inductor)


GPU = Scale("gpu", "resnet18", "resnet34", 256, 224, 1000, (3, 8, 3), 12288, 512, (256, 400), 256, 2, 8, "gpu", (),
            data_epochs=2, compiled_groups=((0,), (1,), (2,)),  # a process per stage: dynamo's recompile limit
            # recipes/imagenet-vith-resnet50-zero3.yaml's models, in a world of one
            big_teacher=("--teacher", "vit_huge_patch14_clip_224", "--student", "resnet50", "--size", "224",
                         "--batch", "32", "--steps", "3", "--warmup", "2", "--world", "1"),
            caps={"env": 120, "shards": 90, "step-compiled-0": 180, "end-to-end": 180, "data-path": 60,
                  "step-eager": 150, "memory": 90, "big-teacher": 120, "step-compiled-1": 90, "step-compiled-2": 90})
CPU = Scale("cpu", "test_resnet", "test_resnet", 8, 32, 10, (1, 1, 2), 128, 32, (36, 64), 16, 1, 2, "cpu",
            ("student.model=test_resnet", "teachers.0.model=test_resnet", "teachers.1.model=test_resnet",
             "data.image_size=32", "data.batch_size=4", "data.num_classes=10", "runtime.threads=1"),
            data_epochs=1, compiled_groups=((0, 1, 2),),  # process start-ups are most of a CPU run's time
            big_teacher=("--teacher", "vit_tiny_patch16_224", "--student", "test_resnet", "--size", "32",
                         "--teacher-kwargs", '{"img_size": 32, "depth": 2}', "--batch", "2", "--steps", "1",
                         "--warmup", "1", "--world", "1", "--classes", "10"),
            caps={"env": 180, "shards": 180, "step-compiled-0": 480, "end-to-end": 420, "data-path": 240,
                  "step-eager": 360, "memory": 360, "big-teacher": 300},
            compile_backend="aot_eager")
MIN_PART_S = 20.0  # what each later part is left at least, when an earlier one is capped by the budget


# ----------------------------------------------------------------------------- running parts


@dataclass
class Part:
    """One measurement process: its command, its time cap, and what it printed."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # pending, ok, failed, timeout, skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    records: list[dict] = field(default_factory=list)
    error: str = ""
    covers: tuple[int, ...] = ()  # the ZeRO stages a step part measures

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": round(self.seconds, 1), "timeout_s": round(self.timeout_s, 1),
                "command": " ".join(self.command), "records": self.records, **({"error": self.error} if self.error else {})}


def run_part(part: Part, timeout: float, env: dict[str, str], log_dir: Path, on_record: Callable[[], None]) -> None:
    """Run ``part`` as its own process group (setsid), collecting its JSON stdout lines; kill it all at ``timeout``."""
    part.timeout_s = timeout
    log_path = log_dir / f"{part.name}.stderr"
    start = time.monotonic()
    with log_path.open("w") as err:
        proc = subprocess.Popen(part.command, cwd=ROOT, env={**env, **part.env}, stdout=subprocess.PIPE,
                                stderr=err, text=True, errors="replace", start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        seen = 0
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                time.sleep(0.25)
                if len(lines) > seen:
                    seen = _collect(part, lines, seen)
                    on_record()
            if proc.poll() is None:
                part.status = "timeout"
                part.error = f"stopped after its {timeout:.0f} s"
        finally:  # also when the suite itself is stopped (SIGTERM, Ctrl-C): no part outlives it
            if proc.poll() is None:
                _kill_session(proc)
        reader.join(timeout=5)
    _collect(part, lines, seen)
    part.seconds = time.monotonic() - start
    if part.status != "timeout":
        part.status = "ok" if proc.returncode == 0 else "failed"
        if proc.returncode != 0:
            tail = _tail(log_path, 40).splitlines() or [""]
            cause = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1])
            part.error = f"exit status {proc.returncode}: {cause.strip()[:300]}"
    on_record()


def _collect(part: Part, lines: list[str], seen: int) -> int:
    for line in lines[seen:]:
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                part.records.append(record)
    return len(lines)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the part's process group: its launcher, ranks and loader workers."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# ----------------------------------------------------------------------------- the plan


def plan(scale: Scale, work: Path, workers: int) -> list[Part]:
    """Every part after install, in priority order (see the module docstring)."""
    py = sys.executable
    shards = work / "e2e"
    step = [py, "bench/step.py", "--student", scale.student, "--teacher", scale.teacher, "--batch", str(scale.batch),
            "--size", str(scale.size), "--classes", str(scale.classes),
            "--warmup", str(scale.step_timing[0]), "--iters", str(scale.step_timing[1]),
            "--rounds", str(scale.step_timing[2])]
    # adapted first where stage 0 has a process of its own (the figure end to end is compared with);
    # elsewhere frozen first, so that a failure of the adapted step leaves the frozen figure measured
    compiled = [Part(f"step-compiled-{group[0]}", step + ["--stages", ",".join(map(str, group)), "--compile",
                                                         "--modes", "adapted,frozen" if group == (0,) else "frozen,adapted"],
                     covers=group) for group in scale.compiled_groups]
    memory_stages = ",".join(str(s) for s in range(4))
    return [
        Part("shards", [py, __file__, "--worker", "shards", "--out", str(shards), "--images", str(scale.images),
                        "--val-images", str(scale.val_images), "--classes", str(scale.classes),
                        "--sides", str(scale.sides[0]), str(scale.sides[1])]),
        compiled[0],
        Part("end-to-end", [py, "bench/end_to_end.py", "--student", scale.student, "--teacher", scale.teacher,
                            "--size", str(scale.size), "--batch", str(scale.e2e_batch), "--images", str(scale.images),
                            "--val-images", str(scale.val_images), "--classes", str(scale.classes),
                            "--epochs", str(scale.e2e_epochs), "--workers", str(workers),
                            "--log-every", str(scale.e2e_log_every), "--compile", "--decode", scale.decode,
                            "--data", str(shards)]),
        Part("data-path", [py, __file__, "--worker", "data-path", "--shards", str(shards / "shards"),
                           "--size", str(scale.size), "--batch", str(scale.e2e_batch), "--workers", str(workers),
                           "--classes", str(scale.classes), "--epochs", str(scale.data_epochs)]),
        Part("step-eager", step + ["--stages", "0,1,2,3", "--modes", "frozen,adapted"]),
        Part("memory", [py, __file__, "--worker", "memory", "--stages", memory_stages, "--work", str(work / "memory"),
                        *[arg for o in scale.memory_overrides for arg in ("--set", o)]]),
        Part("big-teacher", [py, __file__, "--worker", "big-teacher", "--stages", ",".join(map(str, BIG_TEACHER_STAGES)),
                             "--work", str(work / "big-teacher"), "--args", json.dumps(scale.big_teacher)]),
        *compiled[1:],
    ]


def loader_workers(cpus: int, mode: str) -> int:
    """Loader workers for end to end and the data path: most cores on a GPU machine (docs/performance.md: 12 of 16)."""
    return 1 if mode == "cpu" else max(2, min(12, cpus - 4))


# ----------------------------------------------------------------------------- figures


STEP_MODES = ("frozen", "adapted")


def expected_rows(mode: str, big_teacher: Optional[bool] = None) -> list[tuple[str, str]]:
    """(part, configuration) of every row the table must have (big teacher: when its benchmark exists)."""
    rows = [("step", f"ZeRO {s}, teacher {t}, eager") for s in range(4) for t in STEP_MODES]
    rows += [("step", f"ZeRO {s}, teacher {t}, compiled") for s in range(3) for t in STEP_MODES]
    rows += [("end to end", "ATSC adapted, compiled, ZeRO 0"), ("data path", "loader alone")]
    rows += [("memory", f"two teachers, ZeRO {s}") for s in range(4)]
    if BIG_TEACHER.is_file() if big_teacher is None else big_teacher:
        rows += [("big teacher", f"ATSC, ZeRO {s}") for s in BIG_TEACHER_STAGES]
    return rows


def _finite(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def figures(parts: dict[str, Part], mode: str, workers: int) -> list[dict[str, Any]]:
    """The table's rows from the parts' records; a row not measured says why."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def put(part: str, config: str, unit: str, plain: Any, harness: Any, notes: str = "", **extra) -> None:
        p, h = _finite(plain), _finite(harness)
        ratio = round(h / p, 3) if p and h is not None else None
        rows[(part, config)] = {"part": part, "configuration": config, "unit": unit, "plain": p, "harness": h,
                                "ratio": ratio, "notes": notes, **extra}

    plain_compiled: Optional[float] = None
    for name in [n for n in parts if n.startswith("step-")]:
        for r in parts[name].records:
            if "stage" not in r:
                continue
            how = "compiled" if r.get("compile") else "eager"
            peaks = f"peak GB {r['plain_peak_gb']} / {r['harness_peak_gb']}" if "plain_peak_gb" in r else ""
            put("step", f"ZeRO {r['stage']}, teacher {r['teacher']}, {how}", "img/s", r["plain_img_s"],
                r["harness_img_s"], peaks, losses_finite=r.get("losses_finite"))
            if how == "compiled" and r["stage"] == 0 and r["teacher"] == "adapted":
                plain_compiled = r["plain_img_s"]
    reference = "plain compiled ATSC step, data resident"
    summary = next((r for r in parts["end-to-end"].records if r.get("kind") == "summary"), None) \
        if "end-to-end" in parts else None
    if summary:
        wait = summary.get("steady_data_wait")
        put("end to end", "ATSC adapted, compiled, ZeRO 0", "img/s", plain_compiled, summary.get("steady_images_per_s"),
            f"data wait {wait:.1%}, {workers} loader workers, {mode} decode; plain: {reference}"
            if isinstance(wait, (int, float)) else "", data_wait=wait, workers=workers,
            windows=summary.get("windows"), run_images_per_s=summary.get("run_images_per_s"))
    data = next((r for r in parts["data-path"].records if r.get("kind") == "data_path"), None) \
        if "data-path" in parts else None
    if data:
        put("data path", "loader alone", "img/s", plain_compiled, data.get("img_per_s"),
            f"decode, crop, resize, flip, normalise on {data.get('device')}, {data.get('workers')} loader workers; "
            f"plain: {reference}", workers=data.get("workers"))
    plain_mem = next((r for r in parts["memory"].records if r.get("kind") == "plain_memory"), None) \
        if "memory" in parts else None
    for r in parts["memory"].records if "memory" in parts else []:
        if r.get("kind") != "harness_memory":
            continue
        cuda = "step1_peak" in r
        key, unit = ("step1_peak", "peak GB") if cuda else ("step1_saved_for_backward", "MiB saved for backward")
        scale = 2**30 if cuda else 2**20
        plain = plain_mem.get(key) / scale if plain_mem and plain_mem.get(key) is not None else None
        put("memory", f"two teachers, ZeRO {r['zero_stage']}", unit, _round(plain), _round(r[key] / scale),
            f"batch {r['batch']}, {'bf16' if r.get('bf16') else 'fp32'}, world of one",
            saved_for_backward_mib=round(r["step1_saved_for_backward"] / 2**20, 1))
    big = {r["stage"]: r for r in (parts["big-teacher"].records if "big-teacher" in parts else [])
           if r.get("kind") == "big_teacher"}
    for stage, r in big.items():
        peak = r.get("cuda_peak_gib_per_rank")
        put("big teacher", f"ATSC, ZeRO {stage}", "img/s", big[0]["images_per_s"] if 0 in big else None,
            r["images_per_s"], f"{r['teacher']} (adapted) -> {r['student']}, batch {r['batch']}; plain column: the "
            f"harness at ZeRO 0 (the fast path)" + (f"; images/s vs ZeRO 2: {big[2]['step_s'] / r['step_s']:.3f}"
                                                    if 2 in big else "")
            + (f"; CUDA peak {peak[0]:.1f} GiB" if peak else f"; held {r['held_mib_per_rank'][0]:,.0f} MiB"),
            step_s=r["step_s"], held_mib=r["held_mib_per_rank"][0], cuda_peak_gib=peak[0] if peak else None)
    out = []
    for part, config in expected_rows(mode):
        if (part, config) in rows:
            out.append(rows.pop((part, config)))
        else:
            out.append({"part": part, "configuration": config, "unit": "", "plain": None, "harness": None,
                        "ratio": None, "notes": _missing(part, config, parts)})
    return out + list(rows.values())


def _round(x: Optional[float]) -> Optional[float]:
    return round(x, 3) if x is not None else None


def _missing(part: str, config: str, parts: dict[str, Part]) -> str:
    source = {"end to end": ["end-to-end"], "data path": ["data-path"], "memory": ["memory"],
              "big teacher": ["big-teacher"]}.get(part)
    if source is None:
        stage = int(config.split(",")[0].split()[-1])
        source = [n for n, p in parts.items() if stage in p.covers] if "compiled" in config else ["step-eager"]
    if part in ("end to end", "data path"):
        source.append("step-compiled-0")  # the plain reference
    why = [f"{name}: {parts[name].status}" + (f" ({parts[name].error.splitlines()[-1]})" if parts[name].error else "")
           for name in source if name in parts and parts[name].status != "ok"]
    return "not measured: " + ("; ".join(why) if why else "no record")


def markdown(results: dict[str, Any]) -> str:
    """The one table, with a header line saying where and when."""
    env = results.get("env") or {}
    where = env.get("gpu") or f"CPU smoke run ({env.get('cpus', '?')} cores): not GPU figures"
    lines = [f"# bench/gpu_suite.py: {where}, {results['suite']['started']}", "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}, {env.get('cpus', '?')} CPU cores; "
             f"mode {results['suite']['mode']}; {results['suite']['elapsed_s']:.0f} s of a "
             f"{results['suite']['budget_s']:.0f} s budget", "",
             "| part | configuration | unit | plain loop | harness | harness / plain | notes |",
             "|---|---|---|---|---|---|---|"]
    for row in results["figures"]:
        lines.append(f"| {row['part']} | {row['configuration']} | {row['unit']} | {_cell(row['plain'])} | "
                     f"{_cell(row['harness'])} | {_cell(row['ratio'], 3)} | {row['notes']} |")
    failed = [f"- {name}: {p['status']} after {p['seconds']} s" + (f": {p['error'].splitlines()[-1]}" if p.get("error") else "")
              for name, p in results["parts"].items() if p["status"] not in ("ok",)]
    if failed:
        lines += ["", *failed]
    return "\n".join(lines) + "\n"


def _cell(x: Optional[float], digits: int = 0) -> str:
    if x is None:
        return "-"
    if digits:
        return f"{x:.{digits}f}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


# ----------------------------------------------------------------------------- the suite


class Suite:
    """Runs the parts, keeps the results and rewrites OUT's files whenever something arrives."""

    def __init__(self, out: Path, work: Path, budget: float, mode: str, argv: Sequence[str]):
        self.out, self.work, self.budget, self.mode = out, work, budget, mode
        self.start = time.monotonic()
        self.parts: dict[str, Part] = {}
        self.env: dict[str, Any] = {}
        self.workers = 0
        self.lock = threading.Lock()
        self.suite = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
                      "budget_s": budget, "elapsed_s": 0.0, "command": " ".join(["bench/gpu_suite.py", *argv])}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def save(self) -> None:
        with self.lock:
            self.suite["elapsed_s"] = round(time.monotonic() - self.start, 1)
            results = {"suite": self.suite, "env": self.env,
                       "parts": {name: p.summary() for name, p in self.parts.items()},
                       "figures": figures(self.parts, self.mode, self.workers)}
            _write(self.out / RESULTS, json.dumps(results, indent=1))
            _write(self.out / TABLE, markdown(results))
            log = []
            for name, p in self.parts.items():
                log += [f"== {name}: {p.status}, {p.seconds:.1f} s", "$ " + " ".join(p.command),
                        _tail(self.work / "logs" / f"{name}.stderr", 60), ""]
            _write(self.out / LOG, "\n".join(log))

    def run(self, part: Part, cap: float, later: int, env: dict[str, str]) -> Part:
        self.parts[part.name] = part
        timeout = min(cap, self.remaining() - later * MIN_PART_S)
        if timeout < MIN_PART_S / 2:
            part.status, part.error = "skipped", f"no time left in the {self.budget:.0f} s budget"
            self.save()
            return part
        print(f"[{time.monotonic() - self.start:5.0f} s] {part.name} (at most {timeout:.0f} s)", flush=True)
        run_part(part, timeout, env, self.work / "logs", self.save)
        print(f"[{time.monotonic() - self.start:5.0f} s] {part.name}: {part.status} in {part.seconds:.0f} s"
              + (f": {part.error.splitlines()[-1]}" if part.error else ""), flush=True)
        return part


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def base_env(site: Optional[Path], force_cpu: bool) -> dict[str, str]:
    """The parts' environment: the tree first on PYTHONPATH, then the installed wheels; no inherited rank."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    paths = [str(ROOT)] + ([str(site)] if site else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def compile_backend_env(work: Path, env: dict[str, str], backend: str) -> dict[str, str]:
    """A ``sitecustomize`` that makes every ``torch.compile`` in a part's processes (the launcher's
    children too) use ``backend``: the compiled code path without inductor's C++ build on a CPU."""
    folder = work / "compile-backend"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "# written by bench/gpu_suite.py --cpu: torch.compile's backend for the CPU smoke run\n"
        "import functools\nimport torch\n"
        f"torch.compile = functools.partial(torch.compile, backend={backend!r})\n")
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), env["PYTHONPATH"]])}


def install(suite: Suite, wheels: Optional[Path], env: dict[str, str]) -> tuple[Optional[Path], dict[str, str]]:
    """Install ``wheels`` into the work folder (when given and present); the site folder and the new env."""
    if wheels is None:
        return None, env
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        raise SystemExit(f"{wheels}: no wheels there; run `make wheels` on a machine with pip access and carry "
                         f"the folder (docs/performance.md, 'GPU figures: one command'), or leave out --wheels where the "
                         f"project's packages are installed")
    site = suite.work / "site"
    part = Part("install", install_command(wheels, site))
    suite.parts["install"] = part
    run_part(part, max(60.0, min(180.0, suite.remaining())), env, suite.work / "logs", suite.save)
    if part.status != "ok":
        raise SystemExit(f"installing the wheels from {wheels} failed ({part.error}); see {suite.out / LOG}")
    return site, base_env(site, env.get("CUDA_VISIBLE_DEVICES") == "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Figures and how they are measured: the module docstring and docs/performance.md.")
    p.add_argument("out", type=Path, nargs="?", help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    p.add_argument("--wheels", type=Path, help="install these wheels first (a folder `make wheels` filled)")
    p.add_argument("--cpu", action="store_true", help="the small CPU run of the same parts (automatic without CUDA)")
    p.add_argument("--budget", type=float, help="seconds for everything, install included (default 450 on a GPU, "
                                                "1800 on the CPU)")
    p.add_argument("--only", help="comma-separated parts to run (default: all): " + ", ".join(GPU.caps))
    p.add_argument("--work", type=Path, help="scratch folder for shards, logs and the install (default: a "
                                             "temporary one, removed at the end)")
    p.add_argument("--make-wheels", type=Path, metavar="DIR", help="fill DIR with the wheels a bare GPU machine "
                                                                   "needs, then stop (`make wheels`)")
    args = p.parse_args(argv)
    if args.make_wheels:
        make_wheels(args.make_wheels)
        return 0
    if args.out is None:
        p.error("give the folder for the results: python bench/gpu_suite.py OUT")
    args.out.mkdir(parents=True, exist_ok=True)
    # a SIGTERM (a caller's time limit) unwinds like Ctrl-C: the running part is stopped, results stay
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.work or Path(tempfile.mkdtemp(prefix="atsc-gpu-suite-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        return run_suite(args, argv, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run_suite(args: argparse.Namespace, argv: list[str], work: Path) -> int:
    # the mode is known only once torch can be asked (the env part); the budget is the GPU's until then
    suite = Suite(args.out, work, args.budget or (1800.0 if args.cpu else 450.0), "cpu" if args.cpu else "gpu", argv)
    env = base_env(None, args.cpu)
    site, env = install(suite, args.wheels, env)
    check = suite.run(Part("env", [sys.executable, __file__, "--worker", "env"]), 120, 0, env)
    suite.env = next((r for r in check.records if r.get("kind") == "env"), {})
    if check.status != "ok" or suite.env.get("import_errors"):
        suite.save()
        errors = suite.env.get("import_errors") or {"env": check.error}
        print("the project's packages do not import here: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
              + ". On a bare GPU machine run `make wheels` where pip works, carry .whl and pass --wheels .whl "
              "(docs/performance.md, 'GPU figures: one command')", file=sys.stderr)
        return 2
    cpu = args.cpu or not suite.env.get("cuda_available")
    scale = CPU if cpu else GPU
    suite.mode = suite.suite["mode"] = scale.mode
    if cpu and not args.budget:
        suite.budget = suite.suite["budget_s"] = 1800.0
    suite.workers = loader_workers(int(suite.env.get("cpus") or 1), scale.mode)
    env = base_env(site, cpu)
    part_env = compile_backend_env(work, env, scale.compile_backend) if scale.compile_backend else env
    only = set(args.only.split(",")) if args.only else None
    if only and only & {"end-to-end", "data-path"}:
        only.add("shards")  # they read the suite's shards
    parts = [p for p in plan(scale, work, suite.workers) if only is None or p.name in only]
    for i, part in enumerate(parts):
        if part.name == "big-teacher" and not BIG_TEACHER.is_file():
            part.status, part.error = "skipped", f"{BIG_TEACHER.relative_to(ROOT)} is not in this tree"
            suite.parts[part.name] = part
            continue
        uses_compile = part.name.startswith("step") or part.name == "end-to-end"
        suite.run(part, scale.caps[part.name], len(parts) - i - 1, part_env if uses_compile else env)
        if part.name == "shards" and part.status != "ok":
            for dependent in ("end-to-end", "data-path"):
                suite.parts[dependent] = Part(dependent, [], status="skipped", error="the shards were not written")
            parts = [p for p in parts if p.name not in ("end-to-end", "data-path")]
    suite.save()
    rows = json.loads((args.out / RESULTS).read_text())["figures"]
    measured = sum(r["harness"] is not None for r in rows)
    print(f"{measured} of {len(rows)} figures measured in {suite.suite['elapsed_s']:.0f} s: {args.out / TABLE}")
    return 0 if all(p.status == "ok" for p in suite.parts.values()) else 1


# ----------------------------------------------------------------------------- workers (one process each)


def worker_main(argv: list[str]) -> int:
    args = worker_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    {"env": lambda: env_worker(), "shards": lambda: shards_worker(args), "data-path": lambda: data_path_worker(args),
     "memory": lambda: memory_worker(args), "plain-memory": lambda: plain_memory_worker(args),
     "big-teacher": lambda: big_teacher_worker(args)}[args.name]()
    return 0


def worker_parser() -> argparse.ArgumentParser:
    """``--worker NAME ...``: one part's process (the options each worker reads are its own)."""
    p = argparse.ArgumentParser(prog="gpu_suite.py --worker")
    p.add_argument("name", choices=["env", "shards", "data-path", "memory", "plain-memory", "big-teacher"])
    p.add_argument("--out", type=Path)
    p.add_argument("--images", type=int)
    p.add_argument("--val-images", type=int)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--sides", type=int, nargs=2)
    p.add_argument("--shards", type=Path)
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--work", type=Path)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--args", type=json.loads, default=[], help="big-teacher: bench/zero3_teacher.py's (a JSON list)")
    return p


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


IMPORTS = ("torch", "torchvision", "timm", "accelerate", "deepspeed", "webdataset", "braceexpand", "pydantic", "yaml",
           "safetensors", "numpy", "PIL", "harness.run", "harness.data", "harness.zero", "shards.write")


def env_worker() -> None:
    """What the machine has: versions, CUDA, cores; imports that fail; versions that do not satisfy
    what the project (pyproject.toml) and its dependencies require."""
    import importlib
    import importlib.metadata as md
    import platform

    errors = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (any failure to import is reported, whatever its kind)
            errors[module] = f"{type(e).__name__}: {e}"[:300]
    record: dict[str, Any] = {"kind": "env", "python": platform.python_version(), "cpus": os.cpu_count(),
                              "import_errors": errors}
    try:
        import torch

        record.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            record.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                          bf16=torch.cuda.is_bf16_supported())
    except Exception as e:  # noqa: BLE001
        record["torch_error"] = str(e)[:300]
    versions, problems = {}, []
    for name, spec, needed_by in requirements():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} missing (needed by {needed_by})")
            continue
        versions[canonical(name)] = version
        if spec and not _satisfies(version, spec):
            problems.append(f"{name} {version} does not satisfy {spec} (needed by {needed_by})")
    record.update(packages=versions, version_problems=sorted(set(problems)))
    emit(**record)


def requirements() -> list[tuple[str, str, str]]:
    """(name, specifier, needed by) for the project's runtime dependencies and, transitively, theirs
    (markers evaluated here, extras left out), from pyproject.toml and the installed metadata."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    out, queue, seen = [], [(r, "atsc-harness") for r in project_dependencies()], set()
    while queue:
        text, parent = queue.pop(0)
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonical(req.name)
        out.append((name, str(req.specifier), parent))
        if name in seen:
            continue
        seen.add(name)
        try:
            queue += [(r, name) for r in md.requires(name) or []]
        except md.PackageNotFoundError:
            pass
    return out


def project_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml (read as text: tomllib is Python 3.11+)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        text = pyproject.read_text()
        block = text.split("dependencies = [", 1)[1].split("]\n", 1)[0]
        return [line.strip().strip(",").strip('"') for line in block.splitlines()
                if line.strip().startswith('"')]
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def _satisfies(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    try:
        return SpecifierSet(spec).contains(version, prereleases=True)
    except InvalidVersion:
        return True


def _jpeg(args: tuple[int, int, int]) -> tuple[int, bytes]:
    """One photo-like JPEG: smooth random colour fields plus pixel noise (ImageNet-like bytes per pixel)."""
    import io

    import numpy as np
    from PIL import Image

    index, width, height = args
    rng = np.random.default_rng(index)
    base = rng.integers(0, 255, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC)).astype(np.int16)
    img = (img + rng.integers(-12, 12, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return index, buf.getvalue()


def shards_worker(args: argparse.Namespace) -> None:
    """``OUT/shards`` (train and val, ``_info.json``) via ``shards.write`` from a generated ImageFolder tree."""
    from multiprocessing import Pool

    import numpy as np

    start = time.perf_counter()
    tree = args.out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    rng = np.random.default_rng(0)
    total = args.images + args.val_images
    sizes = rng.integers(args.sides[0], args.sides[1] + 1, (total, 2))
    jobs = [(i, int(w), int(h)) for i, (w, h) in enumerate(sizes)]
    nbytes = 0
    with Pool(os.cpu_count()) as pool:
        for i, data in pool.imap_unordered(_jpeg, jobs, chunksize=32):
            split, label = ("train", i % args.classes) if i < args.images else ("val", i % args.classes)
            folder = tree / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img{i:07d}.JPEG").write_bytes(data)
            nbytes += len(data)
    generated = time.perf_counter() - start
    out = args.out / "shards"
    shutil.rmtree(out, ignore_errors=True)
    shard_size = max(16, args.images // 48)  # several shards for every loader worker
    subprocess.run([sys.executable, "-m", "shards.write", str(tree), "--out", str(out), "--shard-size", str(shard_size),
                    "--workers", str(os.cpu_count() or 1)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    info = json.loads((out / "_info.json").read_text())["splits"]
    emit(kind="shards", train=info["train"]["num_samples"], val=info["val"]["num_samples"],
         shards=len(info["train"]["filenames"]), mean_kb=round(nbytes / total / 1024, 1), sides=args.sides,
         generate_s=round(generated, 1), total_s=round(time.perf_counter() - start, 1))


def data_path_worker(args: argparse.Namespace) -> None:
    """The GPU data path alone, as bench/gpu_data.py measures it: workers plan (header, crop box,
    flip), the training process decodes, crops, resizes, flips and normalises on the device.
    Steady images/s over the second epoch, its first batch left out."""
    import torch

    from harness.data import DeferredDecode, EpochLoader, Preprocess, ShardStream

    info = json.loads((args.shards / "_info.json").read_text())["splits"]["train"]
    urls = [str(args.shards / f) for f in info["filenames"]]
    pre = Preprocess(image_size=args.size, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stream = ShardStream(urls, DeferredDecode(pre, ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)), args.classes, args.batch,
                         train=True, shuffle_buffer=512, lengths=dict(zip(urls, info["shard_lengths"])))
    loader = EpochLoader(stream, args.workers, pin_memory=device.type == "cuda", pre=pre, device=device)
    for epoch in range(args.epochs):  # the last is measured; the first has page cache, nvJPEG start-up
        batches = iter(loader.epoch(epoch))
        x, _ = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, seen = time.perf_counter(), 0
        for x, _ in batches:
            seen += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finite = bool(torch.isfinite(x).all())
    emit(kind="data_path", device=device.type, workers=args.workers, batch=args.batch, images=seen,
         img_per_s=round(seen / wall, 1) if wall > 0 else None, output_finite=finite, shape=list(x.shape))


def memory_worker(args: argparse.Namespace) -> None:
    """``bench/zero_memory.py --recipe`` of the two-teacher recipe at each stage (harness) and the plain
    loop over the same models (``--worker plain-memory``), all side by side: peak memory is per process."""
    args.work.mkdir(parents=True, exist_ok=True)
    overrides = [a for o in args.set for a in ("--set", o)]
    procs = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        out = args.work / f"stage{stage}.json"
        procs[f"stage {stage}"] = (subprocess.Popen(
            [sys.executable, "bench/zero_memory.py", "--recipe", TWO_TEACHERS, *overrides,
             "--set", f"runtime.zero_stage={stage}", "--json", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL), out)
    plain = subprocess.Popen([sys.executable, __file__, "--worker", "plain-memory", *overrides], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    plain_out, _ = plain.communicate()
    print(plain_out, end="", flush=True)
    failed = []
    for name, (proc, out) in procs.items():
        if proc.wait() != 0 or not out.is_file():
            failed.append(name)
            continue
        emit(kind="harness_memory", **json.loads(out.read_text()))
    if plain.returncode != 0 or failed:
        raise SystemExit(f"memory: failed: {', '.join(failed + (['plain'] if plain.returncode else []))}")


def plain_memory_worker(args: argparse.Namespace) -> None:
    """The plain loop (bench/step.py's PlainStep, teachers adapted) over the two-teacher recipe's models
    at its batch: two steps, bytes saved for backward and (CUDA) the allocator's peak, as
    ``zero_memory.py --recipe`` reports them for the harness."""
    import torch

    from bench.step import PlainStep
    from bench.zero_memory import SavedBytes, _batch
    from harness.distributed import init_runtime, shutdown
    from harness.recipe import load_recipe

    recipe = load_recipe(ROOT / TWO_TEACHERS, args.set, check_files=False)
    for teacher in recipe.teachers:  # random weights, as zero_memory.py --recipe: no file is read
        teacher.checkpoint = "random-init.pth"
    rt = init_runtime(recipe.runtime.precision, 0, recipe.runtime.threads)
    try:
        cuda = rt.device.type == "cuda"
        torch.manual_seed(0)
        x, y = _batch(recipe, 0, rt.device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        plain = PlainStep(recipe, rt, x, y, adapted=True, channels_last=cuda)
        result: dict[str, Any] = {"recipe": TWO_TEACHERS, "batch": recipe.data.batch_size, "bf16": rt.bf16}
        for step in range(2):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                result[f"step{step}_allocated_before"] = torch.cuda.memory_allocated()
            with SavedBytes() as saved:
                plain()
            result[f"step{step}_saved_for_backward"] = saved.total
            if cuda:
                torch.cuda.synchronize()
                result[f"step{step}_peak"] = torch.cuda.max_memory_allocated()
        emit(kind="plain_memory", **result)
    finally:
        shutdown()



def big_teacher_worker(args: argparse.Namespace) -> None:
    """``bench/zero3_teacher.py`` once per stage (fresh processes each, as it runs them), one record per
    stage as it completes: a stage that fails or runs out of time leaves the others measured."""
    args.work.mkdir(parents=True, exist_ok=True)
    failed = []
    for stage in [int(s) for s in args.stages.split(",")]:
        out = args.work / f"stage{stage}.json"
        result = subprocess.run([sys.executable, str(BIG_TEACHER), *args.args, "--stages", str(stage), "--json", str(out)],
                                cwd=ROOT, stdout=subprocess.DEVNULL)
        if result.returncode != 0 or not out.is_file():
            failed.append(str(stage))
            continue
        measured = json.loads(out.read_text())
        record = {k: v for k, v in measured["stages"][str(stage)].items() if k != "ranks"}
        config = measured["config"]
        emit(kind="big_teacher", stage=stage, teacher=config["teacher"], student=config["student"],
             batch=config["batch"], size=config["size"], world=config["world"], device=measured["device"],
             trainable_params=measured["trainable_params"], **record)
    if failed:
        raise SystemExit(f"big teacher: stage(s) {', '.join(failed)} failed")


if __name__ == "__main__":
    sys.exit(main())
