"""The epoch planner (harness/data/plan.py) at any world size, the tar reader's skip, and the plan command."""
import io
import json
import random
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT
from harness.data import plan_warnings
from harness.data.plan import EpochPlan, main, plan_figures
from harness.data.tars import tar_members


def _lengths(shards: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    return {f"s{i:04d}.tar": rng.randint(1, 400) for i in range(shards)}


def _samples(plan: EpochPlan, spans) -> list[tuple[str, int]]:
    """(shard, index in shard) of every sample the spans name."""
    length = dict(zip(plan.order, plan.lengths))
    return [(s.url, i) for s in spans for i in range(s.start, s.start + (length[s.url] - s.start if s.count is None
                                                                           else s.count))]


@pytest.mark.parametrize("world,workers,batch,accum,shards", [
    (1, 1, 8, 1, 3), (2, 3, 16, 1, 5), (3, 2, 7, 2, 4), (5, 8, 4, 1, 2), (16, 4, 8, 3, 40), (64, 8, 2, 1, 7)])
def test_every_rank_and_worker_gets_whole_batches_of_distinct_samples(world, workers, batch, accum, shards):
    lengths = _lengths(shards, seed=world)
    plan = EpochPlan(list(lengths), lengths, world=world, workers=workers, batch_size=batch, train=True, seed=3,
                     epoch=1, multiple_of=accum)
    global_step = world * batch * accum
    assert plan.batches_per_rank % accum == 0
    assert 0 <= plan.total - plan.samples_per_epoch < global_step  # at most the last partial global step unused
    seen = []
    for rank in range(world):
        rank_samples = []
        for w in range(workers):
            start, stop = plan.worker_range(rank, w)
            assert (stop - start) % batch == 0  # whole batches per worker
            got = _samples(plan, plan.worker_spans(rank, w))
            assert len(got) == stop - start
            rank_samples += got
        assert len(rank_samples) == plan.batches_per_rank * batch  # every rank the same count
        assert _samples(plan, plan.rank_spans(rank)) == rank_samples
        seen += rank_samples
    assert len(set(seen)) == len(seen) == plan.samples_per_epoch  # nothing twice
    assert all(0 <= i < lengths[u] for u, i in seen)
    assert plan.reads() == plan.samples_per_epoch


@pytest.mark.parametrize("world,workers", [(1, 1), (3, 2), (7, 4), (50, 3)])
def test_evaluation_deals_every_sample_and_reads_shards_to_their_end(world, workers):
    lengths = _lengths(6)
    plan = EpochPlan(list(lengths), lengths, world=world, workers=workers, batch_size=16, train=False)
    spans = [s for r in range(world) for w in range(workers) for s in plan.worker_spans(r, w)]
    seen = _samples(plan, spans)
    assert sorted(seen) == sorted((u, i) for u, n in lengths.items() for i in range(n))
    assert all(s.count is None for s in spans if s.start + (s.count or 0) == lengths[s.url] or s.count is None)
    unknown = EpochPlan(["a", "b", "c"], {}, world=2, workers=2, batch_size=4, train=False)
    assert sorted(s.url for r in range(2) for w in range(2) for s in unknown.worker_spans(r, w)) == ["a", "b", "c"]


def test_the_shard_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(30)
    order = [EpochPlan(list(lengths), lengths, world=4, workers=2, batch_size=8, train=True, seed=s, epoch=e).order
             for s, e in [(0, 0), (0, 0), (0, 1), (1, 0)]]
    assert order[0] == order[1] and order[0] != order[2] and order[0] != order[3]


def test_imagenet_at_4096_ranks_uses_all_but_the_last_global_batch():
    counts = [1000] * 1281 + [167]
    lengths = {f"s{i}": n for i, n in enumerate(counts)}
    figures = plan_figures(list(lengths), lengths, world=4096, workers=8, batch_size=64)
    assert figures["samples_per_epoch"] == 4 * 4096 * 64  # 1,281,167 // 262,144 = 4 global batches
    assert figures["reads_per_sample"] == 1.0
    assert figures["samples_per_rank"] == 256


def test_start_up_warnings_name_the_waste_and_the_fix():
    lengths = {f"s{i}": 100 for i in range(10)}  # 1,000 samples
    big_batch = EpochPlan(list(lengths), lengths, world=4, workers=2, batch_size=60, train=True)  # 240 a step
    notes = plan_warnings(big_batch)
    assert len(notes) == 1 and "leaves 40 of the 1000 train samples unused (4.0%)" in notes[0]
    assert "lower `data.batch_size`" in notes[0]
    idle = EpochPlan(list(lengths), lengths, world=2, workers=8, batch_size=100, train=True)  # 5 batches a rank
    assert any("5 batch(es) an epoch for 8 loader workers" in n and "`data.workers` to 5" in n
               for n in plan_warnings(idle))
    fine = EpochPlan(list(lengths), lengths, world=2, workers=2, batch_size=10, train=True)
    assert plan_warnings(fine) == []


def _tar(samples: int, size: int = 3000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(samples):
            for ext, data in (("jpg", bytes([i % 256]) * size), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"dir/k{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Counting(io.BytesIO):
    """A seekable (or not) stream that counts the bytes read from it."""

    def __init__(self, data: bytes, seekable: bool):
        super().__init__(data)
        self.read_bytes, self._seekable = 0, seekable

    def read(self, n=-1):
        out = super().read(n)
        self.read_bytes += len(out)
        return out

    def seekable(self):
        return self._seekable


@pytest.mark.parametrize("seekable", [True, False])
def test_the_tar_reader_skips_to_a_span_without_reading_the_samples_before_it(seekable):
    data = _tar(20)
    stream = _Counting(data, seekable)
    members = list(tar_members(stream, "t.tar", skip_samples=12, max_samples=5))
    assert [n for n, _ in members] == [f"dir/k{i:04d}.{e}" for i in range(12, 17) for e in ("jpg", "cls")]
    assert members[0][1] == bytes([12]) * 3000
    if seekable:  # headers of the skipped members and one past the end: not their 3 KB images
        assert stream.read_bytes < 5 * (3000 + 4 * 512) + 13 * 2 * 512 * 2
    else:  # a pipe cannot seek: the bytes before are read and dropped, but never past the span
        assert stream.read_bytes < 17 * (3000 + 4 * 512) + 512
    assert [n for n, _ in tar_members(io.BytesIO(data), "t.tar", skip_samples=18)] == \
        ["dir/k0018.jpg", "dir/k0018.cls", "dir/k0019.jpg", "dir/k0019.cls"]


def test_plan_command_prints_the_json_its_users_script_against(digits, capsys):
    assert main(["--samples", "1281167", "--shard-size", "1000", "--world", "8", "512", "--workers", "8",
                 "--batch", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["world"] for r in rows] == [8, 512]
    for r in rows:
        assert {"world", "samples_per_epoch", "share", "reads_per_sample", "plan_seconds"} <= set(r)
        assert r["share"] > 0.99 and r["reads_per_sample"] == 1.0
    assert main(["--shard-lengths", str(digits / "_info.json"), "--world", "1", "2", "--workers", "2", "--batch",
                 "16", "--json"]) == 0
    from_info = json.loads(capsys.readouterr().out)
    total = sum(json.loads((digits / "_info.json").read_text())["splits"]["train"]["shard_lengths"])
    assert from_info[0]["samples"] == total and from_info[0]["samples_per_epoch"] == total // 16 * 16


def test_plan_command_reads_a_recipe_and_prints_a_table(digits):
    result = subprocess.run([sys.executable, "-m", "harness.data", "plan", str(ROOT / "recipes" / "demo.yaml"),
                             "--set", f"data.train={digits}/train", "--set", f"data.val={digits}/val",
                             "--world", "1", "4"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "| ranks | workers | batch | samples per epoch |" in result.stdout
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line[:3] in ("| 1", "| 4")]
    assert [r[0] for r in rows] == ["| 1", "| 4"]  # a row per world size
