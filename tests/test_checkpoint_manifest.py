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
