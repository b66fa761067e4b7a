"""Experiment tracking: every ``metrics.jsonl`` record also goes to TensorBoard and the recipe's trackers.

TensorBoard event files are always written (``<output>/tensorboard``); ``runtime.trackers`` adds
Weights & Biases, MLflow or Aim through each library's own client. Records become scalars
keyed ``<kind>/<field>`` (``train/loss``, ``eval/student/top1``, ``eval/0:resnet34/top1``; the
teachers as loaded at step 0 are ``eval_loaded/<teacher>/top1``), at the optimizer step.

A resumed run continues the same runs: TensorBoard's ``purge_step`` (the step after the
checkpoint) hides what the interrupted run logged after its checkpoint, which the resumed run
logs again, and each tracker reopens the run whose id ``<output>/trackers.json`` keeps.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

# tracker -> (module that must import, what to install)
TRACKERS = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow"),
            "aim": ("aim", "pip install aim")}
IDS_FILE = "trackers.json"  # the tracker runs of this output directory, reopened on resume


def check_trackers(trackers: Sequence[str]) -> None:
    """Refuse trackers whose package is not installed, naming the install command (before any training)."""
    from harness.recipe import RecipeError

    missing = [t for t in trackers if importlib.util.find_spec(TRACKERS[t][0]) is None]
    if missing:
        raise RecipeError("`runtime.trackers` asks for " + ", ".join(
            f"{t}, which is not installed (`{TRACKERS[t][1]}`)" for t in missing)
            + "; install it into this environment or remove it from `runtime.trackers`")
    if "wandb" in trackers and not _wandb_can_log():
        raise RecipeError("`runtime.trackers` asks for wandb, but this host has no W&B credentials (WANDB_API_KEY "
                          "or `wandb login`); log offline with WANDB_MODE=offline (then `wandb sync`), or log in")


def _wandb_can_log() -> bool:
    """Whether ``wandb.init`` can start without asking for a key: offline, disabled, or credentials found."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}/{key}", inner)
    elif isinstance(value, (int, float)):  # bool too; strings (a checkpoint path) are not scalars
        yield prefix, float(value)


def scalars(kind: str, fields: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as tracker scalars: ``<kind>/<field>[/<inner>...]``; step and time are axes."""
    out: dict[str, float] = {}
    for key, value in fields.items():
        if key in ("step", "time"):
            continue
        prefix = "eval_loaded" if (kind, key) == ("eval", "teachers_as_loaded") else f"{kind}/{key}"
        out.update(_flatten(prefix, value))
    return out


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as dotted keys (MLflow's parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


class Tracking:
    """TensorBoard plus the asked-for trackers of one run's output directory (main process only).

    Nothing is imported or created until :meth:`open`, which :class:`harness.metrics.MetricsLog`
    calls at the first record, with the step from which the run (re)starts.
    """

    def __init__(self, out: Path, trackers: Sequence[str] = (), project: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[dict[str, Any]] = None):
        self.out, self.trackers = Path(out), list(trackers)
        self.project, self.run_name = project or self.out.name, run_name or self.out.name
        self.config = config or {}
        self.writer = None  # torch's SummaryWriter
        self.others: list[Any] = []  # the trackers' clients (_WandB, _MLflow, _Aim)
        self.last_step = 0

    @property
    def tensorboard_dir(self) -> Path:
        return self.out / "tensorboard"

    def open(self, start_step: int) -> None:
        """Open the event files and tracker runs; events at ``start_step`` and later from earlier runs are purged."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step, flush_secs=30)
        ids_path = self.out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        for name in self.trackers:
            tracker = _CLIENTS[name](self)
            ids[name] = tracker.start(ids.get(name))
            self.others.append(tracker)
        if self.trackers:
            ids_path.write_text(json.dumps(ids, indent=2) + "\n")
        atexit.register(self.close)  # a run that stops or fails still flushes what it logged

    def log(self, kind: str, fields: dict[str, Any]) -> None:
        """Send one record's scalars at its step (records without one: the last step seen)."""
        if self.writer is None:  # closed: the run is over
            return
        step = int(fields.get("step", self.last_step))
        self.last_step = step
        values = scalars(kind, fields)
        if not values:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if kind == "eval":  # rare and worth seeing at once
            self.writer.flush()
        for tracker in self.others:
            tracker.log(values, step=step)

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for tracker in self.others:
            tracker.finish()
        self.others = []


# Each library's own client: Accelerate's tracker classes log through accelerate's logger,
# which needs an Accelerator's state that this harness (its own process group) never creates.


class _WandB:
    """Weights & Biases; WANDB_MODE=offline writes the run under ``<output>/wandb`` for a later ``wandb sync``."""

    def __init__(self, tracking: Tracking):
        self.t = tracking

    def start(self, run_id: Optional[str]) -> str:
        import wandb

        # resume="allow": the id of an earlier incarnation continues that run; console="off": the progress line stays ours
        self.run = wandb.init(project=self.t.project, name=self.t.run_name, dir=str(self.t.out), id=run_id,
                              resume="allow", config=self.t.config, settings=wandb.Settings(console="off"))
        return self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class _MLflow:
    """MLflow; with MLFLOW_TRACKING_URI unset, a SQLite store ``<output>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///...``)."""

    def __init__(self, tracking: Tracking):
        self.t = tracking

    def start(self, run_id: Optional[str]) -> str:
        import mlflow

        # its INFO lines on creating and migrating the SQLite tables say nothing a run needs
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow 3 refuses a bare file store; SQLite is its local default
            mlflow.set_tracking_uri(f"sqlite:///{(self.t.out / 'mlflow.db').resolve()}")
        if run_id is None:
            mlflow.set_experiment(self.t.project)
            self.run = mlflow.start_run(run_name=self.t.run_name)
            params = _flat_config(self.t.config)
            keys = list(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
                mlflow.log_params({k: params[k] for k in keys[i:i + 100]})
        else:
            self.run = mlflow.start_run(run_id=run_id)
        return self.run.info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics(values, step=step)

    def finish(self) -> None:
        import mlflow

        mlflow.end_run()


class _Aim:
    """Aim; its repository is ``<output>/.aim`` (``aim up --repo <output>``)."""

    def __init__(self, tracking: Tracking):
        self.t = tracking

    def start(self, run_hash: Optional[str]) -> str:
        from aim import Run

        self.run = Run(run_hash=run_hash, repo=str(self.t.out), experiment=self.t.project)
        if run_hash is None:
            self.run.name = self.t.run_name
            self.run["hparams"] = self.t.config
        return self.run.hash

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.run.track(value, name=key, step=step)

    def finish(self) -> None:
        self.run.close()


_CLIENTS = {"wandb": _WandB, "mlflow": _MLflow, "aim": _Aim}


def tracking_for(recipe, enabled: bool) -> Optional[Tracking]:
    """The tracking of a run of ``recipe``, on the main process (``enabled``) only."""
    if not enabled:
        return None
    rt = recipe.runtime
    return Tracking(Path(recipe.output), rt.trackers, rt.tracker_project or recipe.name, recipe.name,
                    recipe.model_dump(mode="json"))
