"""Real SLURM (a one-node cluster started by slurm/local-cluster.sh, which .ci/run calls):
a job warned of its end checkpoints, requeues itself, resumes and ends as an uninterrupted run."""
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import LAUNCH_ENV, ROOT, launch_command, processes, rank_pids, records, tiny_recipe, wait_for


def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mix", "alloc"))


pytestmark = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster: run `bash slurm/local-cluster.sh` (root)")


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def trained_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if json.loads(line)["kind"] == "train")


def submit(recipe: Path, *overrides: str, options: tuple[str, ...] = ()) -> str:
    """sbatch [options] slurm/train.sbatch RECIPE --set ...; ``options`` are sbatch's (e.g. --export=ALL,PROCS_PER_NODE=2)."""
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", *options,
                           str(ROOT / "slurm" / "train.sbatch"), str(recipe), *args],
                          capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


_REFERENCES: list[subprocess.Popen] = []  # started by start_reference, ended by the fixture below


@pytest.fixture(autouse=True)
def _no_reference_outlives_its_test():
    yield
    while _REFERENCES:
        reference = _REFERENCES.pop()
        if reference.poll() is None:  # its test failed before finish(): it must not train on beside later tests
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()


def start_reference(recipe: Path, output: Path, processes: int = 1) -> subprocess.Popen:
    """The recipe run straight through to ``output``, beside the job: it trains while SLURM holds
    and restarts the requeued job, instead of after it. Its log: ``output`` + ``.log``. Its own
    process group, so that a test that fails before :func:`finish` ends it with its ranks."""
    with output.with_name(output.name + ".log").open("w") as sink:
        reference = subprocess.Popen(launch_command([str(recipe), "--set", f"output={output}"], processes),
                                     cwd=output.parent, env=LAUNCH_ENV, stdout=sink, stderr=subprocess.STDOUT,
                                     start_new_session=True)
    _REFERENCES.append(reference)
    return reference


def finish(reference: subprocess.Popen, output: Path) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_reference` run; its exit status and log, as ``launch`` gives them."""
    returncode = reference.wait(timeout=900)
    log = output.with_name(output.name + ".log").read_text()
    if returncode != 0:
        print(log[-8000:])
    return subprocess.CompletedProcess(reference.args, returncode, log, "")


def atsc(work, digits, teacher, name):
    return tiny_recipe(work, digits, name, teachers=[{"model": "test_resnet", "checkpoint": str(teacher)}],
                       method={"name": "atsc", "anchor_weight": 1.0, "adapt_after": 1},
                       schedule={"epochs": 12}, runtime={"log_every": 5, "signal_check_every": 2})


def test_warned_job_checkpoints_requeues_resumes_and_matches_an_uninterrupted_run(work, digits, teacher):
    recipe = atsc(work, digits, teacher, "slurm-requeued")
    job = submit(recipe)
    run = work / "slurm-requeued"
    wait_for(lambda: trained_steps(run) >= 1, 180, "the job to start training")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@120 sends
    started = start_reference(recipe, work / "slurm-reference")
    # SLURM holds a requeued job for a while before it may start again
    wait_for(lambda: job_field(job, "JobState") == "COMPLETED" and (run / "summary.json").exists(), 420, "the requeued job")
    assert int(job_field(job, "Restarts")) >= 1
    log = (ROOT / "logs" / f"atsc-{job}.out").read_text()
    assert "requeueing job" in log and "(restart 1)" in log
    reference = finish(started, work / "slurm-reference")
    assert reference.returncode == 0
    resumed, straight = (load_file(str(p / "student.safetensors")) for p in (run, work / "slurm-reference"))
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-6), key


def test_cancelled_job_is_not_requeued(work, digits, teacher):
    job = submit(atsc(work, digits, teacher, "slurm-cancelled"))
    wait_for(lambda: job_field(job, "JobState") == "RUNNING", 120, "the job to run")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: job_field(job, "JobState") in ("CANCELLED", "COMPLETED", "FAILED"), 120, "the job to end")
    time.sleep(3)
    assert job_field(job, "JobState") == "CANCELLED"
    assert job_field(job, "Restarts") == "0"


def test_a_table_runs_as_array_jobs_and_a_second_submission_reuses_every_run(work, digits):
    """`bench/compare.py TABLE --slurm`: teachers, then the runs, as array jobs; the report after them."""
    folder = work / "slurm-table"
    folder.mkdir()
    one_epoch = {"schedule": {"epochs": 1, "name": "cosine"}}
    tiny_recipe(folder, digits, "teacher-t", **one_epoch)
    tiny_recipe(folder, digits, "supervised", **one_epoch)
    tiny_recipe(folder, digits, "simkd", teachers=[{"model": "test_resnet", "checkpoint": "runs/x/teacher-t/student.safetensors"}],
                method={"name": "simkd"}, **one_epoch)
    out = folder / "out"
    (folder / "table.yaml").write_text(yaml.safe_dump({
        "title": "array test", "out": str(out), "seeds": [0, 1],
        "rows": [{"pair": "t -> s", "runs": [{"label": "alone", "recipe": "supervised.yaml"},
                                            {"label": "SimKD", "recipe": "simkd.yaml"}]}]}))
    driver = [sys.executable, str(ROOT / "bench" / "compare.py"), str(folder / "table.yaml")]
    submitted = subprocess.run([*driver, "--slurm"], capture_output=True, text=True, cwd=ROOT)
    assert submitted.returncode == 0, submitted.stderr
    teachers, runs, report = re.search(r"SLURM jobs (\d+), (\d+), (\d+)", submitted.stdout).groups()
    wait_for(lambda: job_field(report, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 420, "the report job")
    assert job_field(report, "JobState") == "COMPLETED", [p.read_text()[-2000:] for p in (out / "logs").glob("slurm-*")]
    results = (out / "results.md").read_text()
    assert "| t -> s | SimKD |" in results and "| teacher | test_resnet (teacher-t, 1 run) |" in results
    for name in ("teacher-t", "supervised-s0", "supervised-s1", "simkd-s0", "simkd-s1"):
        assert (out / name / "compare-key.txt").is_file(), name
    again = subprocess.run(driver, capture_output=True, text=True, cwd=ROOT)  # locally this time: nothing to train
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reusing the finished run") == 5 and "training" not in again.stdout.split("runs (")[1]


TWO_RANKS = "--export=ALL,PROCS_PER_NODE=2"  # two training processes on the (CPU) node


def test_a_rank_killed_mid_epoch_restarts_the_job_which_resumes_and_matches_an_uninterrupted_run(work, digits):
    """Two ranks, mid-epoch checkpoints every 4 steps; SIGKILL rank 1 in the second epoch."""
    # batch 16 on 2 ranks: 44 steps per epoch, so the kill lands well inside the second one (at batch 32
    # the rest of an epoch after its first mid-epoch checkpoint took as long as one poll under CI's load)
    recipe = tiny_recipe(work, digits, "slurm-killed", schedule={"epochs": 3}, data={"batch_size": 16},
                         runtime={"log_every": 2, "checkpoint_steps": 4, "signal_check_every": 2})
    run = work / "slurm-killed"
    job = submit(recipe, options=(TWO_RANKS,))
    published = lambda: [p for p in (run / "checkpoints").glob("epoch0001-step*") if not p.name.endswith(".partial")]
    wait_for(lambda: published(), 300, "a mid-epoch checkpoint in epoch 2", poll=0.05)
    ranks = rank_pids(str(run))
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)  # as the OOM killer would
    killed_at = time.time()
    started = start_reference(recipe, work / "slurm-killed-reference", processes=2)
    wait_for(lambda: job_field(job, "JobState") == "COMPLETED" and (run / "summary.json").exists(), 600,
             "the restarted job")
    log = (ROOT / "logs" / f"atsc-{job}.out").read_text()
    assert "restart 1/3 of job" in log and "(restart 1)" in log, log[-3000:]
    restart, = records(run, "restart")
    assert restart["job"] == job and restart["restart"] == 1 and restart["cause"]
    resumed = [r for r in records(run, "resume") if r["time"] > killed_at]
    assert resumed and resumed[0]["epoch"] == 1 and 44 < resumed[0]["step"] < 88  # a mid-epoch checkpoint
    lost = max(r["step"] for r in records(run, "train") if r["time"] < killed_at) - resumed[0]["step"]
    print(f"restart cause: {restart['cause']}; back {resumed[0]['time'] - killed_at:.0f} s after the kill, "
          f"{lost} logged step(s) redone")
    reference = finish(started, work / "slurm-killed-reference")
    assert reference.returncode == 0
    restarted, straight = (load_file(str(p / "student.safetensors")) for p in (run, work / "slurm-killed-reference"))
    for key in straight:
        assert torch.allclose(restarted[key], straight[key], atol=1e-6), key


def finished_log(job: str, timeout: float = 300) -> str:
    wait_for(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), timeout, f"job {job}")
    log = (ROOT / "logs" / f"atsc-{job}.out").read_text()
    assert job_field(job, "JobState") == "COMPLETED", log[-3000:]
    return log


def test_a_job_gets_whole_nodes_and_a_rank_with_fewer_cores_than_workers_is_warned(work, digits):
    """Steps are confined to their cores here (slurm/local-cluster.sh: task/affinity)."""
    one = subprocess.run(["srun", "--cpus-per-task=1", "grep", "Cpus_allowed_list", "/proc/self/status"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert re.fullmatch(r"Cpus_allowed_list:\s*\d+", one.stdout.strip()), one.stdout  # a step given one core runs on one
    cores = os.cpu_count()
    recipe = tiny_recipe(work, digits, "slurm-cores", schedule={"epochs": 1}, data={"workers": 1})
    whole = finished_log(submit(recipe, options=(TWO_RANKS,)))
    assert f"2 processes, {cores} cores and all the memory per node" in whole
    if cores >= 2:  # one worker per rank fits: no warning (confined to one core, the step would warn)
        assert "loader workers" not in whole, whole[-3000:]
    shared = finished_log(submit(recipe, "output=" + str(work / "slurm-cores-shared"),
                                 options=(TWO_RANKS, "--oversubscribe", "--cpus-per-task=1", "--mem=2000")))
    assert "2 processes, 1 cores and 2000 MB per node" in shared
    assert "warning: rank 0: 1 core(s) here for 2 rank(s), 0.5 per rank, fewer than its `data.workers` = 1" in shared


def job_states(job: str) -> list[str]:
    """JobState of every task of an array job (or of one job)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return [t.split("=", 1)[1] for t in out.split() if t.startswith("JobState=")]


def ended(job: str) -> bool:
    states = job_states(job)
    return bool(states) and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states)


def jpeg_folder(root: Path, classes: int = 3, per_class: dict = {"train": 80, "val": 20}) -> Path:
    """A small ImageFolder of real JPEGs (noisy, 640 x 480: each takes a decode and a resize to shard)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i:03d}.JPEG", quality=90)
    return root


def test_shards_array_job_with_a_task_killed_mid_write_reruns_to_identical_shards(work):
    """3 array tasks, task 1 killed while a shard of its range is half written (one already complete); a rerun
    of that task keeps the complete one and writes the rest; the final step checks the set and writes _info.json;
    every shard is byte-identical to an uninterrupted write."""
    source = jpeg_folder(work / "jpegs")
    out, reference = work / "shards-array", work / "shards-reference"
    args = [str(source), "--out", str(out), "--shard-size", "20", "--max-size", "200", "--workers", "1"]
    sbatch = ["sbatch", "--parsable", f"--chdir={ROOT}", "--cpus-per-task=1"]
    script = str(ROOT / "slurm" / "shards.sbatch")
    array = subprocess.run([*sbatch, "--array=0-2", script, *args], capture_output=True, text=True,
                           check=True).stdout.strip()
    # freeze task 1 while one of its shards is half written (a .tmp), then kill it there
    mine = [f"train-{i:06d}.tar" for i in range(5, 10)]  # task 1's range: shards 5-9 of the 15 (12 train, 3 val)
    half, done = [], []
    deadline = time.time() + 300
    while not half and time.time() < deadline and not ended(f"{array}_1"):
        # caught once a shard of its range is complete and the next one half written
        if not any((out / "train" / name).exists() for name in mine) or \
                not any((out / "train" / f"{name}.tmp").exists() for name in mine):
            time.sleep(0.02)
            continue
        pids = list(processes("shards.write", str(out), "--task 1/3"))  # the task's writer and its pool
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        half = [out / "train" / f"{name}.tmp" for name in mine if (out / "train" / f"{name}.tmp").exists()]
        done = [name for name in mine if (out / "train" / name).exists()]
        if not half:  # it finished that shard before it stopped: try the next one
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    assert half, "task 1 was never caught half-way through a shard"
    subprocess.run(["scancel", "--full", "--signal=KILL", f"{array}_1"], check=True)
    wait_for(lambda: ended(array), 300, "the array's tasks")
    assert job_field(f"{array}_1", "JobState") in ("CANCELLED", "FAILED"), job_states(array)
    assert all(p.exists() for p in half)  # the killed task left its half shard
    rerun = subprocess.run([*sbatch, "--array=1", "--export=ALL,SHARD_TASKS=3", script, *args],
                           capture_output=True, text=True, check=True).stdout.strip()
    final = subprocess.run([*sbatch, f"--dependency=afterany:{rerun}", "--output=logs/%x-%j.out", script, *args],
                           capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: job_field(final, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the final step")
    assert job_field(final, "JobState") == "COMPLETED", (ROOT / "logs" / f"shards-{final}.out").read_text()[-3000:]
    rerun_log = (ROOT / "logs" / f"shards-{rerun}_1.out").read_text()
    # the rerun kept the shards finished before the kill and wrote the rest, the half one among them
    assert f"train: task 1/3: 5 of 12 shards, {5 - len(done)} written, {len(done)} kept" in rerun_log, rerun_log
    assert not list(out.rglob("*.tmp"))
    straight = subprocess.run([sys.executable, "-m", "shards.write", str(source), "--out", str(reference), *args[3:]],
                              cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    written = sorted(p.relative_to(out) for p in out.rglob("*.tar"))
    assert written == sorted(p.relative_to(reference) for p in reference.rglob("*.tar")) and len(written) == 15
    for name in written:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((out / "_info.json").read_text()) == json.loads((reference / "_info.json").read_text())


def test_a_warning_during_start_up_still_ends_in_a_checkpoint_and_a_requeue(work, digits):
    """The stop request of a SIGUSR1 that arrives before the first step is kept (slurm/train.sbatch clears
    stale ones before srun; the run no longer clears them when it starts) and answered at the first check."""
    recipe = tiny_recipe(work, digits, "slurm-early-warning", schedule={"epochs": 2},
                         runtime={"log_every": 2, "signal_check_every": 2})
    run = work / "slurm-early-warning"
    run.mkdir()
    (run / "stop-requeue").touch()  # left by an earlier incarnation: must not stop this one
    job = submit(recipe)
    # the step's launcher has started (so has the batch script's trap), but no step is trained: the run starts up
    wait_for(lambda: bool(processes(str(recipe), "harness/run.py")), 180, "the training step to start", poll=0.05)
    assert trained_steps(run) == 0
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@120 sends
    warned = time.time()
    wait_for(lambda: job_field(job, "JobState") == "COMPLETED" and (run / "summary.json").exists(), 600,
             "the requeued job")
    log = (ROOT / "logs" / f"atsc-{job}.out").read_text()
    assert "SIGUSR1: checkpointing for requeue" in log and "requeueing job" in log and "(restart 1)" in log, log[-3000:]
    assert [r["job"] for r in records(run, "preempted")] == [job]
    resumed = [r for r in records(run, "resume") if r["time"] > warned]
    assert resumed and resumed[0]["step"] == 2, resumed  # checkpointed at the first check after the warning
    assert not (run / "stop-requeue").exists()  # answered, so a later --resume runs on


def test_set_values_with_spaces_braces_and_quotes_reach_the_run_unchanged(work, digits):
    recipe = tiny_recipe(work, digits, "slurm-args", schedule={"epochs": 1})
    output = work / "runs" / "a b"
    train = f"{digits / 'train'}/train-{{000000..000003}}.tar"  # webdataset's brace notation, not the shell's
    job = submit(recipe, f"output={output}", f"data.train={train}", "optim.lr=0.1", "name=it's \"quoted\"")
    finished_log(job)
    ran = yaml.safe_load((output / "recipe.yaml").read_text())  # what harness/run.py read
    assert ran["output"] == str(output) and ran["data"]["train"] == train and ran["name"] == "it's \"quoted\""
    assert (output / "summary.json").exists()
