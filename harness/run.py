"""Train from a recipe: ``accelerate launch harness/run.py recipes/imagenet.yaml``.

The entry point: the command line, the refusals the files decide before anything starts
(:func:`preflight`), start-up (stop-signal handlers, process group, watchdog), then the epoch
loop (:func:`harness.trainer.train`) and how its errors end the process. The module keeps its
``if __name__ == "__main__"`` guard: the loader's workers import it as their ``__main__``.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch

from harness import checkpoint
from harness.build import check_model_files
from harness.data import DataError, DataPlan, plan_data
from harness.distributed import init_runtime, rank_and_world, shutdown
from harness.guard import NonFiniteLoss
from harness.models import ModelError
from harness.recipe import Recipe, RecipeError, load_recipe
from harness.resources import cores_warning
from harness.restarts import exception_cause, record_failure
from harness.signals import StopSignals
from harness.teacher_guard import TeacherCollapsed
from harness.tracking import check_trackers
from harness.trainer import train
from harness.watchdog import Watchdog
from harness.zero import DeepSpeedVersionError, check_version

USER_ERRORS = (RecipeError, ModelError, DataError, checkpoint.CheckpointError, NonFiniteLoss, DeepSpeedVersionError,
               TeacherCollapsed)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line: a recipe, ``--set`` overrides, ``--resume`` and the stops tests and drills use."""
    p = argparse.ArgumentParser(description="Distil a student from a recipe.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key, e.g. --set optim.lr=0.05 (repeatable; recorded in the run)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in the recipe's output directory (its latest checkpoint, or the one given)")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="stop (checkpointed) after N epochs of this invocation, as a preemption would")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop (checkpointed, mid-epoch) after N optimizer steps of this invocation")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run a recipe from the command line; the exit status (0: finished or stopped on request, 2: refused)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as e:
        return refused(str(e))
    try:
        resume_from, data_plan = preflight(recipe, args)
    except USER_ERRORS as e:
        # recorded where the output folder exists (slurm/train.sbatch makes it): a refusal recurs, so it is not retried
        record_failure(recipe.output, rank_and_world()[0], exception_cause(e), None, str(e))
        return refused(f"{args.recipe}: {e}")
    # `kill -USR2 <pid>` prints every thread's Python stack to stderr: where a stuck rank waits.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    # Handlers first: a warning signal that arrives during start-up must not kill the process.
    signals = StopSignals(Path(recipe.output), poll_files=rank_and_world()[0] == 0)
    rr = recipe.runtime
    rt = init_runtime(rr.precision, rr.zero_stage, rr.threads, rr.collective_timeout)
    watchdog = Watchdog(rr.progress_timeout, rt.rank, rt.world_size, recipe.output)
    if rt.local_rank == 0:  # one line per node: its ranks share the cores the scheduler granted
        starved = cores_warning(recipe.data.workers, rt.rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if starved:
            print(starved, file=sys.stderr, flush=True)
    failed = True
    try:
        train(recipe, args, rt, signals, resume_from, watchdog, data_plan)
        checkpoint.finish_pruning()  # after the last save is published: off its critical path
        failed = False
        return 0  # finished, or stopped on request with a checkpoint: both are clean exits
    except USER_ERRORS as e:
        record_failure(recipe.output, rt.rank, exception_cause(e), watchdog.step, str(e))
        # an error every rank met alike (agreed by a collective) is said once, by rank 0; any other by the
        # rank that met it, naming itself
        if not getattr(e, "all_ranks", isinstance(e, NonFiniteLoss)):  # NonFiniteLoss: agreed
            print(f"error: rank {rt.rank}: {args.recipe}: {e}", file=sys.stderr, flush=True)
        elif rt.is_main:
            print(f"error: {args.recipe}: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # a crash: recorded for the restart decision (harness/restarts.py), then raised as ever
        record_failure(recipe.output, rt.rank, exception_cause(e), watchdog.step, repr(e))
        print(f"error: rank {rt.rank} crashed: {exception_cause(e)} (its traceback follows)", file=sys.stderr, flush=True)
        raise
    finally:
        # A failing rank must not wait for its peers: they may be inside a collective it will never
        # join. Its exit closes its connections, their collective fails, and the launcher ends them.
        shutdown(wait_for_peers=not failed)


def resume_point(recipe: Recipe, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` names (None: start afresh); a run in the output folder needs --resume."""
    found = checkpoint.latest(recipe.output)
    if resume is None:
        if found is not None:
            raise RecipeError(f"`output` {recipe.output} already holds a run (checkpoint {found.name}); pass "
                              f"--resume to continue it, or choose another directory with --set output=...")
        return None
    # verified against its manifest once the process group exists (each rank reads a share: train)
    if resume == "latest":
        return checkpoint.latest(recipe.output) or checkpoint.newest_published(recipe.output)  # None: start afresh
    path = Path(resume)
    if not path.is_dir():
        raise RecipeError(f"--resume {resume}: no such checkpoint directory")
    return path


def refused(message: str) -> int:
    """Print a refusal before start-up, once (rank 0: every rank refuses alike); the exit status 2."""
    if rank_and_world()[0] == 0:
        print(f"error: {message}", file=sys.stderr)
    return 2


def preflight(recipe: Recipe, args: argparse.Namespace) -> tuple[Optional[Path], DataPlan]:
    """Every refusal the files can decide, before any process group, engine or output folder exists.

    The output folder (a run there needs --resume; a partitioned checkpoint needs its world
    size), the shards (each key one split, sizes, a full step per rank) and the models
    (known names, checkpoints that fit: a teacher's classifier for ``data.num_classes``).
    Every rank runs it on the same files, so all refuse alike. Returns the checkpoint to
    resume from, if any, and the data plan, which the loaders are built from (each rank lists
    the shard folders once). First of all, the installed DeepSpeed must be one the engine was tested on.
    """
    check_version()
    _, world_size = rank_and_world()  # the launcher's, before any process group; none: a world of one
    resume_from = resume_point(recipe, args.resume)
    if resume_from is not None:
        checkpoint.check_world_size(resume_from, world_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as init_runtime will choose
    data_plan = plan_data(recipe, world_size, device, recipe.runtime.grad_accum)
    check_model_files(recipe)
    check_trackers(recipe.runtime.trackers)
    return resume_from, data_plan


if __name__ == "__main__":
    sys.exit(main())
