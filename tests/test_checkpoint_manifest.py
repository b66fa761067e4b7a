"""Checkpoints are verified before they are trusted: a damaged one is named and an intact older one resumed."""
from pathlib import Path

from conftest import launch, summary, tiny_recipe
from harness import checkpoint, manifest
from test_faults import records


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_the_manifest_names_each_missing_truncated_or_damaged_file(tmp_path):
    saved = tmp_path / "checkpoints" / "epoch0001"
    saved.mkdir(parents=True)
    for name in "abc":
        (saved / f"{name}.pt").write_bytes(bytes(range(256)) * 64)
    manifest.write(saved)
    assert manifest.verify(saved) == []
    (saved / "a.pt").unlink()
    truncate(saved / "b.pt")
    flip_a_bit(saved / "c.pt")
    assert manifest.verify(saved) == ["a.pt is missing", "b.pt is truncated (8,192 of 16,384 bytes)",
                                      "c.pt is damaged (its CRC-32 differs from the one written)"]
    # a checkpoint from before manifests: accepted (checkpoint.load notes it)
    (saved / manifest.NAME).unlink()
    assert manifest.verify(saved) is None and checkpoint.newest_intact(tmp_path) == saved


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(work, digits):
    recipe = tiny_recipe(work, digits, "damaged", schedule={"epochs": 3})
    run, saved = work / "damaged", work / "damaged" / "checkpoints"
    assert launch([str(recipe), "--stop-after-epochs", "2"], cwd=work).returncode == 0
    for damage in (truncate, flip_a_bit):
        damage(saved / "epoch0002" / "mp_rank_00_model_states.pt")
        result = launch([str(recipe), "--resume", "--stop-after-epochs", "1"], cwd=work)
        assert result.returncode == 0
        assert f"checkpoint {saved / 'epoch0002'} is damaged (mp_rank_00_model_states.pt is" in result.stderr
        assert f"resuming from {saved / 'epoch0001'}, the newest intact checkpoint" in result.stderr
        assert records(run, "resume")[-1]["checkpoint"] == str(saved / "epoch0001")
        assert manifest.verify(saved / "epoch0002") == []  # epoch 2 trained again and saved afresh
    # a checkpoint written before manifests existed resumes, with a note; the run finishes
    (saved / "epoch0002" / manifest.NAME).unlink()
    result = launch([str(recipe), "--resume"], cwd=work)
    assert result.returncode == 0 and summary(run)["epochs"] == 3
    assert f"checkpoint {saved / 'epoch0002'} has no manifest.json (written by an older version)" in result.stderr
    # every checkpoint damaged: one clear refusal, nothing loaded
    manifest.write(saved / "epoch0002")  # else it is an older version's, accepted unverified
    for tag in ("epoch0001", "epoch0002", "epoch0003"):
        flip_a_bit(saved / tag / "mp_rank_00_model_states.pt")
    result = launch([str(recipe), "--resume"], cwd=work)
    assert result.returncode != 0  # accelerate turns the run's exit status 2 into 1
    assert f"error: {recipe}: no intact checkpoint under {saved} to resume from" in result.stderr
    assert 'run.py", line' not in result.stderr and "damaged (" not in result.stderr.split("error:")[0]


def test_each_rank_verifies_its_share_and_together_every_file_once(tmp_path):
    files = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": {"bytes": 1, "crc32": "0", "rank": r} for r in range(4)}
    files["mp_rank_00_model_states.pt"] = {"bytes": 1, "crc32": "0", "rank": 0}
    files["old.pt"] = {"bytes": 1, "crc32": "0"}  # written before entries named their rank: dealt by position
    for world in (1, 2, 3, 4, 8):
        shares = [manifest.share(files, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(files), world  # each file exactly once
    assert manifest.share(files, 3, 4) == ["zero_pp_rank_3_mp_rank_00_optim_states.pt"]  # what rank 3 wrote
    saved = tmp_path / "epoch0001"
    saved.mkdir()
    for name in files:
        (saved / name).write_bytes(b"x" * 100)
    manifest.write(saved, manifest.entries(saved, [saved / "zero_pp_rank_1_mp_rank_00_optim_states.pt"], rank=1))
    flip_a_bit(saved / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert manifest.verify(saved, 0, 2) == []  # not rank 0's to read
    assert manifest.verify(saved, 1, 2) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged (its CRC-32 "
                                            "differs from the one written)"]


def test_at_two_ranks_the_writers_checksum_their_files_and_a_damaged_partition_is_agreed_on(work, digits):
    """ZeRO-2 at 2 processes: each rank's partition is recorded with its writer; damage in rank 1's partition
    is found by rank 1 alone and both ranks resume from the older checkpoint."""
    import json

    recipe = tiny_recipe(work, digits, "shared-verify", schedule={"epochs": 3}, runtime={"zero_stage": 2})
    run, saved = work / "shared-verify", work / "shared-verify" / "checkpoints"
    assert launch([str(recipe), "--stop-after-epochs", "2"], cwd=work, processes=2).returncode == 0
    files = json.loads((saved / "epoch0002" / manifest.NAME).read_text())["files"]
    partition = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert files[partition]["rank"] == 1 and files["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["rank"] == 0
    assert all(entry["rank"] == 0 for name, entry in files.items() if "zero_pp_rank_" not in name)
    flip_a_bit(saved / "epoch0002" / partition)
    result = launch([str(recipe), "--resume", "--stop-after-epochs", "1"], cwd=work, processes=2)
    assert result.returncode == 0
    assert f"checkpoint {saved / 'epoch0002'} is damaged ({partition} is damaged" in result.stderr
    assert records(run, "resume")[-1]["checkpoint"] == str(saved / "epoch0001")
