"""The shard stream: every rank the same number of batches, evaluation exact, order reproducible."""
import io

import pytest
import torch

from conftest import ROOT
from harness.data import DataError, EpochLoader, Preprocess, ShardStream, eval_transform, expand_urls, select_shards

PRE = Preprocess(image_size=8, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Shards whose images carry their own sample index in the first two pixels."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    out = tmp_path_factory.mktemp("indexed")
    sizes = {"train": [300, 250, 200, 150], "val": [180, 179]}
    index = 0
    for split, lengths in sizes.items():
        for shard, n in enumerate(lengths):
            with wds.TarWriter(str(out / f"{split}-{shard:06d}.tar")) as sink:
                for _ in range(n):
                    pixels = np.full((8, 8), 7, dtype=np.uint8)
                    pixels[0, 0], pixels[0, 1] = index // 256, index % 256
                    buf = io.BytesIO()
                    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
                    sink.write({"__key__": f"s{index:05d}", "png": buf.getvalue(), "cls": index % 10})
                    index += 1
    return out


def keys_seen(stream: ShardStream, workers: int, epoch: int = 0) -> list[int]:
    """The sample indices the stream delivered, in order."""
    loader = EpochLoader(stream, workers, pin_memory=False, pre=PRE)
    seen = []
    for x, _ in loader.epoch(epoch):
        seen += _indices(x)
    return seen


def _indices(x) -> list[int]:
    pixels = ((x[:, 0, 0, :2] * 0.5 + 0.5) * 255).round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def test_expand_urls_directory_pattern_and_missing(digits):
    assert len(expand_urls(str(digits / "train"))) == 4
    assert len(expand_urls(str(digits / "train" / "train-{000000..000003}.tar"))) == 4
    with pytest.raises(DataError, match="train-000008.tar and 1 more"):
        expand_urls(str(digits / "train" / "train-{000008..000009}.tar"))


def test_a_split_is_what_info_json_lists_with_its_size_whole_or_in_part(digits):
    folder = select_shards(str(digits / "val"), "data.val")
    assert folder.split == "val" and folder.info == str(digits / "_info.json")
    assert folder.urls == [str(digits / "val" / f"val-00000{i}.tar") for i in range(2)]
    assert sum(folder.lengths.values()) == folder.split_samples == 359  # the whole split: its size is known
    pattern = select_shards(str(digits / "train" / "train-{000000..000003}.tar"))
    assert pattern.split == "train" and pattern.split_samples == 1438
    one = select_shards(str(digits / "train" / "train-000000.tar"))  # recipes/compare: a quarter of the split
    assert one.split == "train" and one.split_samples is None and list(one.lengths.values()) == [360]


def test_shards_of_two_splits_given_as_one_are_refused_naming_both(digits):
    with pytest.raises(DataError) as e:
        select_shards(str(digits) + "/{train/train-000000,val/val-000001}.tar", "data.train")
    msg = str(e.value)
    assert msg.startswith("`data.train`: ") and "names the shards of 2 splits: train (1 shard(s)" in msg
    assert "and val (1 shard(s), e.g. " + str(digits / "val" / "val-000001.tar") in msg
    with pytest.raises(DataError, match=rf"{digits} is a dataset folder holding 2 split\(s\): train in "
                                        rf"{digits / 'train'}, val in {digits / 'val'}; give one split's folder"):
        select_shards(str(digits), "data.val")


def test_a_folder_reads_only_listed_shards_and_names_the_others(digits, tmp_path):
    import shutil

    copy = tmp_path / "digits"
    shutil.copytree(digits, copy)
    shutil.copy(copy / "val" / "val-000000.tar", copy / "val" / "old-000009.tar")  # left from another run
    shards = select_shards(str(copy / "val"))
    assert len(shards.urls) == 2 and shards.unlisted == (str(copy / "val" / "old-000009.tar"),)
    (copy / "val" / "val-000001.tar").unlink()
    with pytest.raises(DataError, match=r"_info.json lists 2 shards here but 1 are missing .*val-000001.tar.*rerun"):
        select_shards(str(copy / "val"))


def test_an_evaluation_must_see_the_whole_split_it_was_given(digits):
    whole = select_shards(str(digits / "val"))
    whole.check_evaluated(359)
    with pytest.raises(DataError, match=r"saw 357 samples, but .*_info.json gives split val 359 \(2 missing\): "
                                        r"samples that do not decode .* `python -m shards.verify "):
        whole.check_evaluated(357)
    with pytest.raises(DataError, match=r"\(1 too many\): the shards hold more samples than _info.json lists"):
        whole.check_evaluated(360)
    select_shards(str(digits / "val" / "val-000000.tar")).check_evaluated(3)  # part of a split: no whole to check


def test_evaluation_with_a_sample_that_does_not_decode_stops(digits, tmp_path):
    """The run's evaluation (harness/trainer.py) on a split whose shard lost a sample: refused, not a smaller top-1."""
    import shutil
    import tarfile

    import timm
    from harness.distributed import Runtime
    from harness.trainer import evaluate_split

    copy = tmp_path / "digits"
    shutil.copytree(digits, copy)
    shard = copy / "val" / "val-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = b"not a png" if m.name == members[1][0].name else data  # the first sample's image
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    val = select_shards(str(copy / "val"))
    loader = EpochLoader(ShardStream(val.urls, eval_transform(PRE), 10, 64, train=False), 0, pin_memory=False,
                         pre=PRE, shards=val)
    rt = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, bf16=False, zero_stage=0)
    model = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(DataError, match=r"saw 358 samples, but .*gives split val 359 \(1 missing\)"):
        evaluate_split({"student": model}, loader, rt, image_size=8)


VAL = range(900, 900 + 359)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_sample_exactly_once_for_any_world_size(indexed, world):
    urls = expand_urls(str(indexed / "val-{000000..000001}.tar"))
    union = []
    for rank in range(world):  # 3 ranks x 2 workers: more readers than shards
        union += keys_seen(ShardStream(urls, eval_transform(PRE), 10, 16, train=False, rank=rank, world_size=world),
                           workers=2)
    assert sorted(union) == list(VAL)


TRAIN_LENGTHS = [300, 250, 200, 150]


def _train_stream(indexed, rank, world, shards=4, seed=0):
    urls = expand_urls(str(indexed / f"train-{{000000..{shards - 1:06d}}}.tar"))
    lengths = dict(zip(urls, TRAIN_LENGTHS))
    return ShardStream(urls, eval_transform(PRE), 10, 32, train=True, seed=seed, rank=rank, world_size=world,
                       shuffle_buffer=100, lengths=lengths)


def test_ranks_yield_the_same_number_of_batches_with_no_sample_twice(indexed):
    for epoch in range(3):
        per_rank = [keys_seen(_train_stream(indexed, r, 2), workers=2, epoch=epoch) for r in range(2)]
        n = EpochLoader(_train_stream(indexed, 0, 2), 2, pin_memory=False, pre=PRE).batches_in_epoch(epoch)
        assert n >= 12  # 900 samples over 2 ranks x 2 workers, batch 32: at most a batch lost per worker
        assert [len(s) for s in per_rank] == [n * 32, n * 32]
        union = per_rank[0] + per_rank[1]
        assert len(set(union)) == len(union)  # nothing twice, within or across ranks
        assert set(union) <= set(range(900))


def test_a_rank_left_short_tops_up_instead_of_ending_early(indexed, caplog):
    stream = _train_stream(indexed, 0, 2)
    stream.lengths = {u: 2 * n for u, n in stream.lengths.items()}  # _info.json promises more than there is
    loader = EpochLoader(stream, 2, pin_memory=False, pre=PRE)
    n = loader.batches_in_epoch(0)
    assert sum(1 for _ in loader.epoch(0)) == n
    assert "topping up" in caplog.text


def test_resume_mid_epoch_continues_with_exactly_the_unseen_samples(indexed):
    straight = keys_seen(_train_stream(indexed, 1, 2), workers=2, epoch=1)
    loader = EpochLoader(_train_stream(indexed, 1, 2), 2, pin_memory=False, pre=PRE)
    first = []
    for i, (x, _) in enumerate(loader.epoch(1)):
        first += _indices(x)
        if i == 4:  # stop after 5 batches: an odd count, so the worker round-robin must rotate
            break
    position = loader.position
    assert position.batches == 5
    resumed = EpochLoader(_train_stream(indexed, 1, 2), 2, pin_memory=False, pre=PRE)
    rest = []
    for x, _ in resumed.epoch(1, position):
        rest += _indices(x)
    assert first + rest == straight  # same samples, same order, none twice, none skipped


def test_order_is_a_function_of_seed_and_epoch(indexed):
    first = keys_seen(_train_stream(indexed, 0, 1), workers=2, epoch=0)
    again = keys_seen(_train_stream(indexed, 0, 1), workers=2, epoch=0)
    other = keys_seen(_train_stream(indexed, 0, 1), workers=2, epoch=1)
    assert first == again
    assert first != other


def test_one_shard_feeds_two_ranks_each_its_half(indexed):
    """Samples are dealt, not shards: fewer shards than ranks is no longer a limit."""
    per_rank = [keys_seen(_train_stream(indexed, r, 2, shards=1), workers=2) for r in range(2)]
    assert [len(s) for s in per_rank] == [4 * 32, 4 * 32]  # 300 samples: 4 batches of 32 per rank
    assert sorted(per_rank[0] + per_rank[1]) == list(range(256))  # the shard's first 256, each once


def test_a_split_smaller_than_one_optimizer_step_is_refused_with_the_count(digits):
    from harness.data import plan_data
    from harness.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [f"data.train={digits}/train", f"data.val={digits}/val",
                                               "data.batch_size=1024"], check_files=False)
    with pytest.raises(DataError, match="give no full optimizer step on 2 rank"):
        plan_data(recipe, 2, torch.device("cpu"))


def test_corrupt_sample_is_skipped_and_the_run_goes_on(tmp_path, digits, caplog):
    import webdataset as wds
    from PIL import Image

    shard = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(10):
            buf = io.BytesIO()
            Image.new("L", (8, 8), i * 20).save(buf, format="PNG")
            sink.write({"__key__": f"ok{i}", "png": buf.getvalue(), "cls": i})
        sink.write({"__key__": "broken", "png": b"not an image", "cls": 1})
        sink.write({"__key__": "badlabel", "png": buf.getvalue(), "cls": 99})
    stream = ShardStream([str(shard)], eval_transform(PRE), 10, 4, train=False)
    loader = EpochLoader(stream, 0, pin_memory=False, pre=PRE)
    assert sum(len(y) for _, y in loader.epoch(0)) == 10
    assert loader.position.skipped == 2
    assert "broken" in caplog.text and "badlabel" in caplog.text


@pytest.mark.parametrize("world,workers", [(1, 3), (2, 2), (3, 3)])
def test_an_epoch_is_the_data_set_every_sample_once_as_the_plan_says(indexed, world, workers):
    """Unequal shards (300/250/200/150), several workers: what the loaders deliver is what the planner counts."""
    from harness.data.plan import plan_figures

    urls = expand_urls(str(indexed / "train-{000000..000003}.tar"))
    figures = plan_figures(urls, dict(zip(urls, TRAIN_LENGTHS)), world, workers, 32)
    for epoch in range(2):
        union = []
        for rank in range(world):
            loader = EpochLoader(_train_stream(indexed, rank, world), workers, pin_memory=False, pre=PRE)
            seen = [i for x, _ in loader.epoch(epoch) for i in _indices(x)]
            assert len(seen) == figures["batches_per_rank"] * 32 == loader.batches_in_epoch(epoch) * 32
            union += seen
        assert len(set(union)) == len(union) == figures["samples_per_epoch"]  # each sample once
        assert 900 - len(union) < world * 32  # all but the last partial global batch


def test_a_mid_epoch_resume_on_every_rank_still_sees_each_sample_once(indexed):
    world, workers = 3, 3
    union = []
    for rank in range(world):
        loader = EpochLoader(_train_stream(indexed, rank, world), workers, pin_memory=False, pre=PRE)
        for i, (x, _) in enumerate(loader.epoch(0)):
            union += _indices(x)
            if i == 1:
                break
        resumed = EpochLoader(_train_stream(indexed, rank, world), workers, pin_memory=False, pre=PRE)
        union += [i for x, _ in resumed.epoch(0, loader.position) for i in _indices(x)]
    assert len(set(union)) == len(union) == 900 // 96 * 96
