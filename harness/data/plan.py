"""Which samples each rank and loader worker reads in an epoch: samples dealt, not shards.

An epoch's samples, in the epoch's shuffled shard order, form one sequence of ``total``
samples (shard lengths from ``_info.json``). In training every rank takes a contiguous range
of ``batches_per_rank x batch_size`` samples of it, and within the rank each loader worker a
contiguous run of whole batches; ranges start and end inside shards, and a worker whose range
starts inside a shard skips to it in the tar reader (:func:`harness.data.tars.tar_members`,
a seek per member on a local shard). So at any world size and worker count:

* an epoch uses every sample once, except the remainder of the last global batch (fewer than
  ``world x batch_size x multiple_of`` samples, a different remainder each epoch);
* each sample is read from storage once (no worker reads samples only to drop them);
* every rank delivers the same number of full batches, known before any data is read;
* planning costs one shuffle and one prefix sum over the shards: O(shards) per rank, with
  nothing that grows with the world size (0.4 ms for ImageNet's 1,282 shards at 4,096 ranks, one core).

Evaluation deals every sample the same way with no remainder (batches may be short); shards of
unknown length are dealt whole, to ranks and then workers, each read by one of them.

Pure Python, no torch: ``python -m harness.data plan`` (:func:`main`) replays it for any cluster
size, and :func:`plan_warnings` words what a plan costs that a user can fix.
"""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Span:
    """``count`` samples of one shard from sample ``start`` on (``count`` None: to the shard's end)."""

    url: str
    start: int = 0
    count: Optional[int] = None


def epoch_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a pure function of ``(seed, epoch)``, the same on every rank."""
    order = list(urls)
    random.Random(hash((seed, epoch)) & 0xFFFFFFFF).shuffle(order)
    return order


def share_of(total: int, parts: int, i: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``i`` when ``total`` items are cut into ``parts`` near-equal runs."""
    return total * i // parts, total * (i + 1) // parts


class EpochPlan:
    """One epoch's deal of samples to ``world`` ranks x ``workers`` loader workers.

    ``train``: the shard order is shuffled by ``(seed, epoch)``, ranks get equal ranges of whole
    batches (a multiple of ``multiple_of`` batches each: whole optimizer steps), workers whole
    batches of their rank's range. Otherwise (evaluation) the given order, every sample dealt.
    ``lengths`` gives each shard's sample count; in evaluation shards it lacks are dealt whole.
    """

    def __init__(self, urls: Sequence[str], lengths: dict[str, int], *, world: int, workers: int, batch_size: int,
                 train: bool, seed: int = 0, epoch: int = 0, multiple_of: int = 1):
        self.world, self.workers, self.batch_size, self.train = world, max(workers, 1), batch_size, train
        self.multiple_of = max(multiple_of, 1)
        self.order = epoch_order(urls, seed, epoch) if train else list(urls)
        self.known = all(u in lengths for u in self.order)
        if train and not self.known:
            missing = next(u for u in self.order if u not in lengths)
            raise ValueError(f"training needs every shard's sample count; none for {missing}")
        self.lengths = [lengths.get(u, 0) for u in self.order]
        self.offsets = [0, *itertools.accumulate(self.lengths)]  # start of each shard in the epoch's sequence
        self.total = self.offsets[-1]
        step = world * batch_size * self.multiple_of
        self.batches_per_rank = (self.total // step) * self.multiple_of if train else None

    @property
    def samples_per_epoch(self) -> int:
        """Samples the epoch uses, over all ranks."""
        return self.world * self.batches_per_rank * self.batch_size if self.train else self.total

    # --- ranges in the epoch's sample sequence

    def rank_range(self, rank: int) -> tuple[int, int]:
        if self.train:
            per_rank = self.batches_per_rank * self.batch_size
            return rank * per_rank, (rank + 1) * per_rank
        return share_of(self.total, self.world, rank)

    def worker_range(self, rank: int, worker: int) -> tuple[int, int]:
        """A worker's range: whole batches of its rank's in training (the first workers one more)."""
        start, stop = self.rank_range(rank)
        if self.train:
            first, last = share_of(self.batches_per_rank, self.workers, worker)
            return start + first * self.batch_size, start + last * self.batch_size
        a, b = share_of(stop - start, self.workers, worker)
        return start + a, start + b

    def spans(self, start: int, stop: int) -> list[Span]:
        """The shard pieces that hold samples ``[start, stop)`` of the epoch's sequence."""
        out: list[Span] = []
        i = bisect.bisect_right(self.offsets, start) - 1
        while start < stop and i < len(self.order):
            begin, end = self.offsets[i], self.offsets[i + 1]
            if end > start:
                take = min(stop, end) - start
                # an evaluation reads a shard to its end: more samples there than _info.json lists must show
                to_end = not self.train and start + take == end
                out.append(Span(self.order[i], start - begin, None if to_end else take))
                start += take
            i += 1
        return out

    def worker_spans(self, rank: int, worker: int) -> list[Span]:
        """What one loader worker of one rank reads this epoch, in order."""
        if not self.known:  # evaluation over shards of unknown length: whole shards, to ranks then workers
            return [Span(u) for u in self.order[rank::self.world][worker::self.workers]]
        return self.spans(*self.worker_range(rank, worker))

    def rank_spans(self, rank: int) -> list[Span]:
        return [s for w in range(self.workers) for s in self.worker_spans(rank, w)]

    def reads(self) -> int:
        """Samples read from storage this epoch, over all ranks and workers (planned, no data read)."""
        if not self.known:
            return self.total
        return sum(stop - start for r in range(self.world) for start, stop in
                   (self.worker_range(r, w) for w in range(self.workers)))


UNUSED_WARN = 0.01  # a larger share of the split left out of every epoch is worth a line at start-up


def plan_warnings(plan: EpochPlan) -> list[str]:
    """What a training plan costs that a user can fix, one line each (empty when nothing does)."""
    notes = []
    unused = plan.total - plan.samples_per_epoch
    if unused > UNUSED_WARN * plan.total:
        step = plan.world * plan.batch_size * plan.multiple_of
        notes.append(f"each epoch leaves {unused} of the {plan.total} train samples unused "
                     f"({100 * unused / plan.total:.1f}%): the split is {plan.total / step:.2f} global batches of "
                     f"{step}; lower `data.batch_size` (or `runtime.grad_accum`) or use fewer processes")
    if plan.batches_per_rank < plan.workers:
        notes.append(f"each rank has {plan.batches_per_rank} batch(es) an epoch for {plan.workers} loader workers: "
                     f"{plan.workers - plan.batches_per_rank} worker(s) per rank start and read nothing; set "
                     f"`data.workers` to {max(plan.batches_per_rank, 1)} or fewer")
    return notes


# --- `python -m harness.data plan`: an epoch's plan for any cluster size, no shard read

def plan_figures(urls: Sequence[str], lengths: dict[str, int], world: int, workers: int, batch_size: int,
                 multiple_of: int = 1, repeat: int = 3) -> dict:
    """One world size's epoch: samples used and their share, reads per sample, and one rank's planning time.

    ``plan_seconds`` is what each rank pays at the start of an epoch: the plan, its batch count
    and its own workers' spans (best of ``repeat``, on the last rank, whose range is the deepest).
    """
    import time

    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        plan = EpochPlan(urls, lengths, world=world, workers=workers, batch_size=batch_size, train=True,
                         multiple_of=multiple_of)
        for w in range(plan.workers):
            plan.worker_spans(world - 1, w)
        seconds = min(seconds, time.perf_counter() - start)
    used = plan.samples_per_epoch
    return {"world": world, "workers": plan.workers, "batch": batch_size, "samples": plan.total,
            "samples_per_epoch": used, "share": used / plan.total if plan.total else 0.0,
            "reads_per_sample": plan.reads() / used if used else 0.0, "samples_per_rank": used // world,
            "batches_per_rank": plan.batches_per_rank, "plan_seconds": seconds}


def _lengths_from(args) -> tuple[list[str], dict[str, int], int]:
    """Shard names and lengths from the command line: a recipe, --shard-lengths, or --samples/--shard-size."""
    if args.recipe:
        from harness.data.shards import DataError, select_shards
        from harness.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(args.recipe, args.set, check_files=False)
            train = select_shards(recipe.data.train, "data.train")
        except (RecipeError, DataError) as e:
            raise SystemExit(f"error: {e}") from None
        d = recipe.data
        args.workers = args.workers or [max(d.workers, 1)]
        args.batch = args.batch or [d.batch_size]
        args.grad_accum = args.grad_accum or recipe.runtime.grad_accum
        if len(train.lengths) == len(train.urls):
            return train.urls, train.lengths, args.grad_accum
        if not d.train_samples:
            raise SystemExit(f"error: no _info.json lists the shards of {d.train} and `data.train_samples` is not "
                             f"set: write shards with `python -m shards.write`, or plan with --samples/--shard-size")
        return train.urls, {u: d.train_samples // len(train.urls) for u in train.urls}, args.grad_accum
    if args.shard_lengths:
        counts = _read_lengths(args.shard_lengths, args.split)
    elif args.samples and args.shard_size:
        counts = [args.shard_size] * (args.samples // args.shard_size)
        if args.samples % args.shard_size:
            counts.append(args.samples % args.shard_size)
    else:
        raise SystemExit("error: give a recipe, --shard-lengths, or --samples with --shard-size")
    urls = [f"shard-{i:06d}.tar" for i in range(len(counts))]
    return urls, dict(zip(urls, counts)), args.grad_accum or 1


def _read_lengths(source: str, split: str) -> list[int]:
    """Shard lengths from an ``_info.json`` (its ``split``) or a comma-separated list."""
    import json
    import os

    if not os.path.exists(source):
        try:
            return [int(n) for n in source.split(",")]
        except ValueError:
            raise SystemExit(f"error: --shard-lengths {source}: neither a file nor a comma-separated list") from None
    try:
        with open(source) as f:
            return [int(n) for n in json.load(f)["splits"][split]["shard_lengths"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --shard-lengths {source}: no shard_lengths for split {split!r} "
                         f"({type(e).__name__}: {e}); give an _info.json written by shards.write") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m harness.data plan",
                                description="An epoch's plan at any world size, from shard lengths alone (no shard "
                                            "is read): samples used and their share of the split, reads per sample, "
                                            "samples per rank and each rank's planning time.")
    p.add_argument("recipe", nargs="?", help="a recipe: its train shards, batch size, workers and grad_accum")
    p.add_argument("--set", action="append", default=[], help="a recipe override, KEY=VALUE (repeatable)")
    p.add_argument("--samples", type=int, help="samples in the train split (with --shard-size)")
    p.add_argument("--shard-size", type=int, help="samples per shard, the last one holding the rest")
    p.add_argument("--shard-lengths", help="an _info.json (see --split) or a comma-separated list of shard lengths")
    p.add_argument("--split", default="train", help="the _info.json split (default: train)")
    p.add_argument("--world", type=int, nargs="+", default=[8, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--workers", type=int, nargs="+", help="loader workers per rank (default: the recipe's, else 8)")
    p.add_argument("--batch", type=int, nargs="+", help="batch per rank (default: the recipe's, else 64)")
    p.add_argument("--grad-accum", type=int, help="batches per optimizer step (default: the recipe's, else 1)")
    p.add_argument("--json", action="store_true", help="a JSON list of objects instead of the table")
    args = p.parse_args(argv)
    urls, lengths, accum = _lengths_from(args)
    rows = [plan_figures(urls, lengths, world, workers, batch, accum)
            for world in args.world for workers in (args.workers or [8]) for batch in (args.batch or [64])]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(urls)} shards, {sum(lengths.values())} samples, {accum} batch(es) per optimizer step")
    print("| ranks | workers | batch | samples per epoch | share | reads per sample | samples per rank | plan per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']:,} | {r['workers']} | {r['batch']} | {r['samples_per_epoch']:,} | {100 * r['share']:.1f}% "
              f"| {r['reads_per_sample']:.2f} | {r['samples_per_rank']:,} | {1000 * r['plan_seconds']:.2f} ms |")
    return 0
