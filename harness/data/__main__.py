"""``python -m harness.data plan ...``: an epoch's plan at any cluster size, from shard lengths alone.

The command itself is :func:`harness.data.plan.main`; this checks for the ``plan`` word the
documented command line starts with.
"""
import sys

from harness.data.plan import main as plan_main

if __name__ == "__main__":
    if sys.argv[1:2] != ["plan"]:
        sys.exit("usage: python -m harness.data plan [RECIPE | --samples N --shard-size S | --shard-lengths F] "
                 "[--world N ...] [--workers N ...] [--batch N ...] [--json]")
    sys.exit(plan_main(sys.argv[2:]))
