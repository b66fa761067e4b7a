"""The shard stream: every rank the same number of batches, evaluation exact, order reproducible."""
import pytest

from harness.data import DataError, EpochLoader, Preprocess, ShardStream, eval_transform, expand_urls

PRE = Preprocess(image_size=8, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Shards whose images carry their own sample index in the first two pixels."""
    import io

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
    loader = EpochLoader(stream, workers, pin_memory=False)
    seen = []
    for x, _ in loader.epoch(epoch):
        pixels = ((x[:, 0, 0, :2] * 0.5 + 0.5) * 255).round().long()
        seen += (pixels[:, 0] * 256 + pixels[:, 1]).tolist()
    return seen


def test_expand_urls_directory_pattern_and_missing(digits):
    assert len(expand_urls(str(digits))) == 6
    assert len(expand_urls(str(digits / "train-{000000..000003}.tar"))) == 4
    with pytest.raises(FileNotFoundError, match="train-000008.tar and 1 more"):
        expand_urls(str(digits / "train-{000008..000009}.tar"))


VAL = range(900, 900 + 359)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_sample_exactly_once_for_any_world_size(indexed, world):
    urls = expand_urls(str(indexed / "val-{000000..000001}.tar"))
    union = []
    for rank in range(world):  # 3 ranks x 2 workers: more readers than shards
        union += keys_seen(ShardStream(urls, eval_transform(PRE), 10, 16, train=False, rank=rank, world_size=world),
                           workers=2)
    assert sorted(union) == list(VAL)


def _train_stream(urls, rank, world, batches, seed=0):
    return ShardStream(urls, eval_transform(PRE), 10, 32, train=True, seed=seed, rank=rank, world_size=world,
                       shuffle_buffer=100, batches_per_epoch=batches)


def test_training_ranks_yield_the_same_number_of_batches_without_duplicates(indexed):
    urls = expand_urls(str(indexed / "train-{000000..000003}.tar"))  # 300/250/200/150 samples: uneven
    batches = 900 // (32 * 2)
    per_rank = [keys_seen(_train_stream(urls, r, 2, batches), workers=2) for r in range(2)]
    assert [len(s) for s in per_rank] == [batches * 32, batches * 32]
    # shards are dealt to ranks: no sample reaches both
    assert not set(per_rank[0]) & set(per_rank[1])
    # with uneven shards a worker whose shard is smaller than its share of batches starts it
    # over (samples repeat within the rank; exactly-once epochs are the shards issue's work),
    # but no rank is ever short of batches and most of the epoch is seen
    assert len(set(per_rank[0]) | set(per_rank[1])) >= 0.75 * 900


def test_a_rank_whose_shards_run_dry_starts_over_instead_of_stopping(indexed):
    urls = expand_urls(str(indexed / "train-{000000..000002}.tar"))  # 3 shards, 2 ranks
    batches = 750 // (32 * 2) + 5
    for rank in range(2):
        assert len(keys_seen(_train_stream(urls, rank, 2, batches), workers=2)) == batches * 32


def test_order_is_a_function_of_seed_and_epoch(indexed):
    urls = expand_urls(str(indexed / "train-{000000..000003}.tar"))
    first = keys_seen(_train_stream(urls, 0, 1, 10), workers=2, epoch=0)
    again = keys_seen(_train_stream(urls, 0, 1, 10), workers=2, epoch=0)
    other = keys_seen(_train_stream(urls, 0, 1, 10), workers=2, epoch=1)
    assert first == again
    assert first != other


def test_too_few_train_shards_for_the_ranks_is_refused_with_the_count(digits):
    urls = expand_urls(str(digits / "train-000000.tar"))
    with pytest.raises(DataError, match="1 train shards cannot feed 2 ranks"):
        _train_stream(urls, 0, 2, 5)


def test_corrupt_sample_is_skipped_and_the_run_goes_on(tmp_path, digits, caplog):
    import io
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
    seen = keys_seen(stream, workers=0)
    assert len(seen) == 10
    assert "broken" in caplog.text and "badlabel" in caplog.text
