"""The shard stream: every rank the same number of batches, evaluation exact, order reproducible."""
import collections

import pytest

from harness.data import DataError, EpochLoader, Preprocess, ShardStream, eval_transform, expand_urls

PRE = Preprocess(image_size=8, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def keys_seen(stream: ShardStream, workers: int, epoch: int = 0) -> list[tuple]:
    loader = EpochLoader(stream, workers, pin_memory=False)
    seen = []
    for x, y in loader.epoch(epoch):
        seen += [(tuple(img.flatten()[:64].tolist()), int(label)) for img, label in zip(x, y)]
    return seen


def test_expand_urls_directory_pattern_and_missing(digits):
    assert len(expand_urls(str(digits))) == 6
    assert len(expand_urls(str(digits / "train-{000000..000003}.tar"))) == 4
    with pytest.raises(FileNotFoundError, match="train-000009.tar"):
        expand_urls(str(digits / "train-{000008..000009}.tar"))


def test_evaluation_sees_every_sample_exactly_once_across_2_ranks_x_2_workers(digits):
    urls = expand_urls(str(digits / "val-{000000..000001}.tar"))
    reference = keys_seen(ShardStream(urls, eval_transform(PRE), 10, 16, train=False), workers=0)
    assert len(reference) == 359
    union = []
    for rank in range(2):
        union += keys_seen(ShardStream(urls, eval_transform(PRE), 10, 16, train=False, rank=rank, world_size=2), workers=2)
    assert collections.Counter(union) == collections.Counter(reference)


def test_evaluation_with_more_ranks_than_shards_is_still_exact(digits):
    urls = expand_urls(str(digits / "val-{000000..000001}.tar"))
    union = []
    for rank in range(3):
        union += keys_seen(ShardStream(urls, eval_transform(PRE), 10, 16, train=False, rank=rank, world_size=3), workers=2)
    assert len(union) == 359


def _train_stream(urls, rank, world, batches, seed=0):
    return ShardStream(urls, eval_transform(PRE), 10, 32, train=True, seed=seed, rank=rank, world_size=world,
                       shuffle_buffer=100, batches_per_epoch=batches)


def test_training_ranks_yield_the_same_number_of_batches_and_cover_the_epoch(digits):
    urls = expand_urls(str(digits / "train-{000000..000003}.tar"))
    batches = 1438 // (32 * 2)
    per_rank = [keys_seen(_train_stream(urls, r, 2, batches), workers=2) for r in range(2)]
    assert [len(s) for s in per_rank] == [batches * 32, batches * 32]
    # shards are dealt to ranks: nothing is seen by both, and nearly the whole epoch is seen
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) >= 0.95 * 1438


def test_a_rank_whose_shards_run_dry_starts_over_instead_of_stopping(digits):
    urls = expand_urls(str(digits / "train-{000000..000002}.tar"))  # 3 shards, 2 ranks: uneven
    batches = 1078 // (32 * 2) + 3
    for rank in range(2):
        assert len(keys_seen(_train_stream(urls, rank, 2, batches), workers=2)) == batches * 32


def test_order_is_a_function_of_seed_and_epoch(digits):
    urls = expand_urls(str(digits / "train-{000000..000003}.tar"))
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
