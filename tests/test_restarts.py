"""Restart decisions (harness/restarts.py): bounded, counted per job across requeues, and never
again for a failure that recurs at the same step with the same cause. tests/test_slurm.py runs
the real thing; these cover each rule without a cluster."""
from pathlib import Path

from conftest import records
from harness.restarts import main, record_failure


def decide(run: Path, job: str = "7", status: int = 1, limit: int = 3) -> int:
    return main(["failed", str(run), "--job", job, "--status", str(status), "--max", str(limit)])


def test_a_failure_that_recurs_at_the_same_step_is_not_retried_and_says_why(tmp_path, capsys):
    record_failure(tmp_path, 1, "DataError: shard x.tar is damaged", 40, "long message")
    assert decide(tmp_path) == 0
    assert "restart 1/3 of job 7 after: DataError: shard x.tar is damaged (rank 1, at step 40)" in capsys.readouterr().out
    assert not list(tmp_path.glob("failure-rank*.json"))  # consumed: the next step starts clean
    record_failure(tmp_path, 0, "DataError: shard x.tar is damaged", 40, "long message")
    assert decide(tmp_path) == 1
    assert "the same failure recurred at the same step" in capsys.readouterr().out
    assert [r["restart"] for r in records(tmp_path, "restart")] == [1]
    refused, = records(tmp_path, "restart_refused")
    assert refused["step"] == 40 and refused["cause"].startswith("DataError")


def test_the_same_cause_at_a_later_step_is_retried(tmp_path):
    for step in (10, 20):
        record_failure(tmp_path, 0, "hang: rank(s) 1 stopped answering", step, "")
        assert decide(tmp_path) == 0
    assert [r["step"] for r in records(tmp_path, "restart")] == [10, 20]


def test_restarts_are_bounded_per_job_and_a_new_job_starts_counting_again(tmp_path, capsys):
    for _ in range(2):  # no record: a rank was SIGKILLed or its node lost; never "the same failure"
        assert decide(tmp_path, limit=2, status=137) == 0
    assert decide(tmp_path, limit=2, status=137) == 1
    out = capsys.readouterr().out
    assert "exit status 137, no rank recorded an error" in out and "its 2 automatic restarts are used" in out
    assert decide(tmp_path, job="8", limit=2) == 0


def test_a_requeue_by_slurm_itself_counts_as_a_restart(tmp_path, capsys):
    main(["preempted", str(tmp_path), "--job", "7"])  # our own requeue on the time-limit warning: not a failure
    main(["started", str(tmp_path), "--job", "7", "--slurm-restarts", "1"])
    assert not list(filter(None, capsys.readouterr().out.splitlines()))
    main(["started", str(tmp_path), "--job", "7", "--slurm-restarts", "2"])  # the node failed: nobody recorded it
    assert "requeued by SLURM without the batch script" in capsys.readouterr().out
    assert records(tmp_path, "restart")[0]["restart"] == 1


def test_a_watchdog_never_replaces_a_record_that_holds_the_real_cause(tmp_path):
    import json
    import time

    started = time.time()
    record_failure(tmp_path, 1, "OSError: disk gone", 7, "OSError('disk gone')")
    # what harness/watchdog.py writes when the rank that raised then hung on its way out
    record_failure(tmp_path, 1, "hang: no rank progressed", 7, "no step", keep_since=started)
    assert json.loads((tmp_path / "failure-rank1.json").read_text())["cause"] == "OSError: disk gone"
    # a record left by an earlier process (before this one started) is not this failure's cause: replaced
    record_failure(tmp_path, 1, "hang: no rank progressed", 9, "no step", keep_since=time.time() + 1)
    assert json.loads((tmp_path / "failure-rank1.json").read_text())["cause"] == "hang: no rank progressed"
