"""Recipes: one YAML file describes a whole run.

The schema below is the single source of truth: validation, defaults, the command-line
overrides (``--set optim.lr=0.05``) and the key reference of docs/recipes.md
(``python -m harness.recipe --docs``) all come from it, so they cannot drift apart.

Every error a user can cause here ends as one :class:`RecipeError` whose message names the
recipe file, the key, and what would be valid.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe the harness cannot run. The message is meant for the user, as is."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Augment(_Section):
    """Training-time augmentation of the shared crop (teachers and student see the same one)."""

    kind: Literal["rrc", "cifar"] = Field("rrc", description="rrc: RandomResizedCrop (`crop_scale`, `crop_ratio`), evaluated with a resize and a `data.crop_pct` center crop; cifar: the CIFAR literature's augmentation: shorter side to `data.image_size` (a no-op for 32 px images at 32), `padding` px of zeros, a random `data.image_size` crop, evaluated on the whole image (`data.crop_pct` 1.0); `data.decode: auto` then decodes on the CPU")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="rrc: RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="rrc: RandomResizedCrop aspect range")
    padding: int = Field(4, ge=0, description="cifar: zero padding on each side, in pixels, before the random crop")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    # Beyond the crop and flip: timm's augmentations (harness/data/augment.py). Off by default, and off the run is unchanged.
    auto_augment: Optional[str] = Field(None, description="per-sample policy after the crop and flip, in timm's strings: 'rand-m9-mstd0.5-inc1' (RandAugment), 'original' / 'v0' (AutoAugment), 'augmix-m5-w4-d2' (AugMix), or 'trivialaugment' (torchvision's TrivialAugmentWide; timm has none); CPU data path only (`data.decode: auto` then decodes on the CPU); null: none")
    color_jitter: float = Field(0.0, ge=0, description="colour jitter after the policy: brightness, contrast and saturation factors drawn from [1 - v, 1 + v] (timm's scalar `--color-jitter`, e.g. 0.4; torchvision's ColorJitter); CPU data path only; 0: none")
    erase_prob: float = Field(0.0, ge=0, le=1, description="random erasing (timm's RandomErasing, `--reprob`): probability per image of erasing rectangles of the normalised batch, in the training process on either data path; 0: none")
    erase_mode: Literal["const", "rand", "pixel"] = Field("const", description="random erasing fill (`--remode`): const: zeros (the mean colour after normalisation); rand: one normal colour per rectangle; pixel: normal noise per pixel")
    erase_count: int = Field(1, ge=1, description="random erasing: at most this many rectangles per image, the count drawn from 1..N and the area split among them (`--recount`)")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (timm's Mixup, `--mixup`, e.g. 0.8): the batch blended with itself reversed, lam ~ Beta(alpha, alpha), labels become lam * y + (1 - lam) * y reversed (soft targets for every CE term); both data paths; 0: off")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (`--cutmix`, e.g. 1.0): a box of the reversed batch pasted in, labels mixed by its area; with `mixup` too, one of the two per batch (`mixup_switch_prob`); 0: off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability that Mixup/CutMix is applied to a batch (or element, per `mixup_mode`) (`--mixup-prob`)")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="with `mixup` and `cutmix` both on, probability of CutMix instead of Mixup (`--mixup-switch-prob`)")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="Mixup/CutMix parameters drawn once per batch, per pair of elements, or per element (`--mixup-mode`)")

    @field_validator("auto_augment")
    @classmethod
    def _policy_known(cls, policy: Optional[str]) -> Optional[str]:
        if policy:
            from harness.data.augment import auto_augment_op  # local: timm is imported only when a policy is set

            auto_augment_op(policy, 224, (0.5, 0.5, 0.5))  # ValueError naming the accepted forms
        return policy or None

    @property
    def per_sample_pixels(self) -> list[str]:
        """The keys set that need the decoded image in a loader worker (the CPU data path)."""
        return [k for k, on in (("auto_augment", bool(self.auto_augment)), ("color_jitter", self.color_jitter > 0)) if on]


class Data(_Section):
    train: str = Field(..., description="train shards: a split's folder (the shards its _info.json lists there, e.g. 'data/imagenet/train'), one shard, or a brace pattern ('d/train/train-{000000..000009}.tar'); shards of two splits are refused")
    val: str = Field(..., description="validation shards, same forms as `train`; given a whole split, an evaluation must see every sample _info.json counts")
    num_classes: int = Field(..., gt=1, description="classes in the label space; every classifier must match it")
    image_size: int = Field(224, gt=0, description="side of the square crop fed to the models")
    crop_pct: Optional[float] = Field(None, gt=0, le=1, description="eval center-crop fraction; null: the student's own (timm pretrained_cfg); 1.0, the only value it takes, under `augment.kind: cifar`")
    mean: Optional[tuple[float, float, float]] = Field(None, description="normalisation mean; null: the student's own")
    std: Optional[tuple[float, float, float]] = Field(None, description="normalisation std; null: the student's own")
    batch_size: int = Field(64, gt=0, description="images per device per micro-step")
    workers: int = Field(4, ge=0, description="loader worker processes per device")
    shuffle_buffer: int = Field(5000, ge=0, description="samples mixed within a worker before batching")
    train_samples: Optional[int] = Field(None, gt=0, description="train set size; null: read from the shards' _info.json")
    decode: Literal["auto", "cpu", "gpu"] = Field("auto", description="where images are decoded: cpu: in the loader workers (PIL); gpu: batched nvJPEG in the training process, workers only read headers and draw crops (needs CUDA); non-JPEG images are decoded in the workers and sent as pixels; auto: gpu on CUDA devices unless `augment.kind` is cifar or `augment.auto_augment` / `color_jitter` is set, else cpu")
    augment: Augment = Field(default_factory=Augment)

    def check_augment(self) -> None:
        """Refuse augmentation the chosen data path cannot run (called by :class:`Recipe`, so messages name no section)."""
        pixels = self.augment.per_sample_pixels
        if pixels and self.decode == "gpu":
            keys = " and ".join(f"`data.augment.{k}`" for k in pixels)
            raise ValueError(f"{keys} transform each decoded image in the loader workers, but with `data.decode: gpu` "
                             f"the workers only read JPEG headers and the pixels exist only on the GPU; set "
                             f"`data.decode: cpu` (or `auto`, which then decodes on the CPU), or remove {keys}")
        if (self.augment.mixup > 0 or self.augment.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"Mixup/CutMix (`data.augment.mixup`, `cutmix`) pair each image with its mirror in the "
                             f"batch and need an even `data.batch_size`, not {self.batch_size}")


class Student(_Section):
    model: str = Field(..., description="timm model name")
    checkpoint: Optional[str] = Field(None, description="weights to start from (.pth/.safetensors); null: random init")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")


class Teacher(_Section):
    model: str = Field(..., description="timm model name")
    checkpoint: Optional[str] = Field(None, description="local weights file (.pth/.safetensors); one of `checkpoint`, `hub` is required")
    hub: Optional[str] = Field(None, description="Hugging Face hub id (e.g. 'timm/resnet34.a1_in1k') for hosts with network")
    weight: float = Field(1.0, gt=0, description="a_k: weight of this teacher's classifier in the student's prediction (normalised over teachers)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")
    image_size: Optional[int] = Field(None, gt=0, description="side the teacher sees (the student's crop, resized); null: `data.image_size`")
    mean: Optional[tuple[float, float, float]] = Field(None, description="the teacher's normalisation mean; null: from its checkpoint if this harness exported it, else timm's pretrained_cfg")
    std: Optional[tuple[float, float, float]] = Field(None, description="the teacher's normalisation std; null: as `mean`")

    @model_validator(mode="after")
    def _one_source(self) -> "Teacher":
        if (self.checkpoint is None) == (self.hub is None):
            raise ValueError("give exactly one of `checkpoint` (a local file) or `hub` (a hub id)")
        return self


class TeacherGuard(_Section):
    """Watches each adapting teacher's own top-1 on the training batches and acts when it falls (atsc)."""

    max_drop: float = Field(2.0, ge=0, description="points of top-1: the guard acts when a teacher's smoothed training top-1 falls more than this below its level when adaptation started")
    action: Literal["warn", "freeze", "stop"] = Field("freeze", description="warn: log it and go on; freeze: that teacher's lr is 0 and its BatchNorm in eval mode from then on (SimKD with the weights adapted so far); stop: checkpoint, then exit non-zero with the message")
    window: int = Field(10, gt=0, description="optimizer steps: the start level is the mean over the first `window` adapted steps, and the smoothed value an exponential average over about as many; checked at each log step after the first `window`")


class Method(_Section):
    name: Literal["supervised", "kd", "simkd", "atsc"] = Field(..., description="the method (ATSC.md section 3)")
    feature_weight: float = Field(1.0, ge=0, description="beta: weight of the feature MSE (simkd, atsc)")
    anchor_weight: float = Field(10.0, ge=0, description="w: weight of sum ||W - W0||^2 over multi-dimensional teacher weights (atsc)")
    ce_weight: float = Field(0.0, ge=0, description="c: weight of the CE of the student's own head (kd: the hard-label term, usually 1 - alpha)")
    kd_weight: float = Field(0.0, ge=0, description="d: weight of T^2 KL(teacher || student head) at `temperature` (kd: alpha)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the KL terms")
    projector_factor: int = Field(2, ge=1, description="f: projector bottleneck C_t / f")
    bias_step: Literal["fused", "two_pass"] = Field("fused", description="fused: one teacher forward per step; two_pass: the authors' second forward for the bias step")
    adapt_after: int = Field(0, ge=0, description="epochs with teachers frozen (exact SimKD) before they adapt (atsc)")
    teacher_bn: Literal["train", "eval", "frozen"] = Field("train", description="the adapting teachers' BatchNorm (atsc): train: batch statistics, running statistics updated, scale and shift trained (the authors'); eval: running statistics used and kept, scale and shift trained; frozen: running statistics used and kept, scale and shift not trained")
    anchor_scope: Literal["weights", "all"] = Field("weights", description="the teacher parameters the anchor holds near W0 (atsc): weights: the multi-dimensional ones (ATSC.md, the authors'); all: every one the teacher's optimizer steps, BatchNorm scales and shifts and biases included")
    teacher_guard: Optional[TeacherGuard] = Field(default_factory=TeacherGuard, description="the guard of the adapting teachers' own accuracy (atsc); null: off")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the supervised CE terms")


class Optim(_Section):
    name: Literal["sgd", "adamw"] = Field("sgd", description="the optimizer")
    lr: float = Field(..., gt=0, description="peak learning rate at `lr_batch` images per optimizer step")
    lr_batch: Optional[int] = Field(None, gt=0, description="batch the lr is quoted for; the lr scales linearly to the real global batch; null: no scaling")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay (decoupled for adamw)")
    decay_groups: Literal["all", "timm"] = Field("all", description="which weights decay: `all` (the paper recipes' SGD settings), or `timm`: none on biases, norms and 1-D parameters, nor on the names a model's `no_weight_decay()` lists (pos_embed, cls_token), as timm's `param_groups_weight_decay` and DeiT")
    teacher_lr_mult: float = Field(1.0, ge=0, description="teacher lr = student lr x this (atsc)")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the global gradient norm to this; null: no clipping")


class Schedule(_Section):
    epochs: int = Field(..., gt=0, description="training epochs")
    name: Literal["step", "cosine"] = Field("step", description="step decay at milestones, or cosine to `min_lr_factor`")
    milestones: list[int] = Field(default_factory=list, description="step: epochs at which the lr is multiplied by `gamma`")
    gamma: float = Field(0.1, gt=0, description="step: lr factor at each milestone")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from `warmup_factor` x lr, in epochs (fractions allowed)")
    warmup_factor: float = Field(0.01, ge=0, le=1, description="lr factor at the first warm-up step")
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine: final lr as a fraction of the peak")


class Ema(_Section):
    """An exponential moving average of the deployed student, evaluated beside it and exported as its own file."""

    decay: float = Field(0.9998, gt=0, lt=1, description="EMA decay per optimizer step (timm ModelEmaV3's `decay`)")
    warmup: bool = Field(False, description="ramp the decay up as timm's ModelEmaV3 `use_warmup`: min(decay, 1 - (1 + step / warmup_gamma) ** -warmup_power)")
    warmup_gamma: float = Field(1.0, gt=0, description="warm-up: timm's `warmup_gamma`")
    warmup_power: float = Field(2 / 3, gt=0, description="warm-up: timm's `warmup_power`")
    update_after: int = Field(0, ge=0, description="optimizer steps before the EMA starts averaging (a copy of the weights until then)")
    every: int = Field(1, gt=0, description="optimizer steps between EMA updates")


class Runtime(_Section):
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPUs that support it, else fp32")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 for student, projectors and adapted teachers")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    seed: int = Field(0, description="seed of initialisation, data order and augmentation")
    log_every: int = Field(20, gt=0, description="optimizer steps between metric records (losses are read from the device only then)")
    eval_every: int = Field(1, gt=0, description="epochs between evaluations (the last epoch is always evaluated)")
    checkpoint_every: int = Field(1, gt=0, description="epochs between resumable checkpoints (the last epoch always saves)")
    checkpoint_steps: Optional[int] = Field(None, gt=0, description="also checkpoint every N optimizer steps mid-epoch (resumes at that batch); null: epoch ends only")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept: the newest N, plus the best by student top-1")
    signal_check_every: int = Field(10, gt=0, description="optimizer steps between checks (one tiny collective) for a stop signal: SIGUSR1 saves and exits for requeue, SIGTERM saves and stops")
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads per process; null: torch's default")
    trackers: list[Literal["wandb", "mlflow", "aim"]] = Field(default_factory=list, description="experiment trackers beside the TensorBoard event files every run writes (`<output>/tensorboard`): wandb, mlflow, aim, each when its package is installed (offline: WANDB_MODE=offline; MLflow without MLFLOW_TRACKING_URI writes `<output>/mlflow.db`; Aim `<output>/.aim`); a resume continues the same tracker run")
    tracker_project: Optional[str] = Field(None, description="project / experiment name in the trackers; null: the recipe's name")
    ema: Optional[Ema] = Field(None, description="an EMA of the deployed student (backbone, projectors, shared classifiers); null: none")
    compile: bool = Field(False, description="torch.compile the distiller's training forward (student, projectors, teachers); stages 0-2; the first steps are slow while it compiles")
    max_nonfinite_steps: int = Field(20, gt=0, description="optimizer steps in a row with a NaN/inf loss (each skipped, on every rank) before the run stops, naming the last good checkpoint; checked every `signal_check_every` steps")
    collective_timeout: float = Field(900, gt=0, description="seconds a collective (all-reduce, barrier) may wait for its peers before it fails (torch's default: 30 min for gloo); keep it above `progress_timeout`, which names the ranks that stopped")
    progress_timeout: Optional[float] = Field(600, gt=0, description="seconds without a completed step, evaluation batch or checkpoint after which every rank prints its stacks and exits non-zero, naming the ranks that stopped answering (slurm/train.sbatch then restarts the job); longer than the slowest step or save; null: no watchdog")


class Recipe(_Section):
    name: Optional[str] = Field(None, description="run name; null: the recipe file's stem")
    output: str = Field(..., description="output directory of the run")
    data: Data
    student: Student
    teachers: list[Teacher] = Field(default_factory=list, description="teachers (kd, simkd, atsc); empty for supervised")
    method: Method
    optim: Optim
    schedule: Schedule
    runtime: Runtime = Field(default_factory=Runtime)
    overrides: list[str] = Field(default_factory=list, description="set by the harness: the --set overrides applied to this recipe")

    @property
    def teacher_names(self) -> list[str]:
        """``<index>:<model>`` per teacher: their keys in evaluations, ``metrics.jsonl``, the summary and drift."""
        return [f"{i}:{t.model}" for i, t in enumerate(self.teachers)]

    @model_validator(mode="before")
    @classmethod
    def _cifar_crop_pct(cls, tree: Any) -> Any:
        """`augment.kind: cifar` evaluates the whole image: a missing `data.crop_pct` resolves to 1.0."""
        data = tree.get("data") if isinstance(tree, dict) else None
        augment = data.get("augment") if isinstance(data, dict) else None
        if isinstance(augment, dict) and augment.get("kind") == "cifar" and data.get("crop_pct") is None:
            tree = {**tree, "data": {**data, "crop_pct": 1.0}}
        return tree

    @model_validator(mode="after")
    def _augment_fits(self) -> "Recipe":
        self.data.check_augment()
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> "Recipe":
        name = self.method.name
        if self.data.augment.kind == "cifar" and self.data.crop_pct != 1.0:
            raise ValueError(f"`data.augment.kind: cifar` evaluates the whole image, without a center crop, but "
                             f"`data.crop_pct` is {self.data.crop_pct}; remove `data.crop_pct` or set it to 1.0")
        if name == "supervised" and self.teachers:
            raise ValueError("`method.name: supervised` trains the student alone; remove `teachers` or pick kd/simkd/atsc")
        if name != "supervised" and not self.teachers:
            raise ValueError(f"`method.name: {name}` needs at least one entry in `teachers`")
        if name == "kd" and len(self.teachers) > 1:
            raise ValueError("`method.name: kd` takes one teacher; use simkd or atsc for several")
        if self.runtime.compile and self.runtime.zero_stage == 3:
            raise ValueError("`runtime.compile` is not supported with `runtime.zero_stage: 3`, whose per-module "
                             "parameter gathering hooks break the compiled graph; use stage 0-2 or set compile false")
        if self.method.bias_step == "two_pass" and self.runtime.zero_stage == 3:
            raise ValueError("`method.bias_step: two_pass` steps the classifier bias outside the ZeRO engine, "
                             "which stage 3 partitions; use `fused` or `runtime.zero_stage` 0-2")
        if self.method.adapt_after >= self.schedule.epochs and name == "atsc":
            raise ValueError(f"`method.adapt_after` ({self.method.adapt_after}) must be below `schedule.epochs` "
                             f"({self.schedule.epochs}) for atsc; use simkd for a teacher that never adapts")
        return self


# ----------------------------------------------------------------------------- loading


def _format_error(err: dict, source: str) -> str:
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        section = _section_at(err["loc"][:-1])
        valid = sorted(section.model_fields) if section else []
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"{source}: unknown key `{loc}`{hint}; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{source}: missing required key `{loc}`"
    got = err.get("input")
    where = f"`{loc}`: " if loc else ""
    return f"{source}: {where}{msg} (got {got!r})" if loc else f"{source}: {msg}"


def _section_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The schema class that owns the keys at `loc` (list indices skipped)."""
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _model_of(field.annotation)
        if cls is None:
            return None
    return cls


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found:
            return found
    return None


def apply_override(tree: dict, assignment: str, source: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"{source}: override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    node: Any = tree
    parts = path.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        try:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})
        except (IndexError, TypeError):
            raise RecipeError(f"{source}: override {assignment!r}: `{'.'.join(parts[:i + 1])}` does not exist") from None
    last: Any = int(parts[-1]) if isinstance(node, list) and parts[-1].isdigit() else parts[-1]
    node[last] = value


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe. Raises :class:`RecipeError` with a user-facing message."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found; recipes live in recipes/ (e.g. recipes/demo.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of sections (data, student, method, ...)")
    overrides = list(overrides or [])
    for assignment in overrides:
        apply_override(tree, assignment, source)
    tree["overrides"] = list(tree.get("overrides") or []) + overrides
    tree.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError("\n".join(_format_error(err, source) for err in e.errors(include_url=False))) from None
    if check_files:
        check_recipe_files(recipe, source, base=Path.cwd())
    return recipe


def check_recipe_files(recipe: Recipe, source: str, base: Path) -> None:
    """Every local file the recipe names must exist before anything starts."""
    from harness.data import DataError, select_shards  # local: keeps this module importable without torch

    problems = []
    for key, pattern in (("data.train", recipe.data.train), ("data.val", recipe.data.val)):
        try:
            select_shards(pattern, key)  # exist, and each is one split of its _info.json
        except DataError as e:
            problems.append(f"{source}: {e}")
    if recipe.student.checkpoint and not (base / recipe.student.checkpoint).is_file():
        problems.append(f"{source}: `student.checkpoint`: file not found: {recipe.student.checkpoint}")
    for i, teacher in enumerate(recipe.teachers):
        if teacher.checkpoint and not (base / teacher.checkpoint).is_file():
            problems.append(f"{source}: `teachers[{i}].checkpoint`: file not found: {teacher.checkpoint}; "
                            f"train one with a `supervised` recipe (see recipes/demo-teacher.yaml) or fix the path")
    if problems:
        raise RecipeError("\n".join(problems))


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe, every default filled in, as written into each run's directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- docs


def _type_name(annotation: Any) -> str:
    origin, args = getattr(annotation, "__origin__", None), getattr(annotation, "__args__", ())
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return f"{' or '.join(_type_name(a) for a in inner)} or null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if annotation is Any else getattr(annotation, "__name__", str(annotation))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def recipe_docs() -> str:
    """Markdown table of every recipe key with its type, default and meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            key = f"{prefix}{name}"
            sub = _model_of(field.annotation)
            if sub is not None and key != "teachers":
                if field.description:
                    rows.append(f"| `{key}` | section | | {_cell(field.description)} |")
                walk(sub, f"{key}[]." if "list" in str(field.annotation) else f"{key}.")
                continue
            if field.is_required():
                default = "**required**"
            else:
                value = field.get_default(call_default_factory=True)
                default = "" if isinstance(value, BaseModel) else f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"
            rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {_cell(field.description or '')} |")
            if sub is not None:
                walk(sub, f"{key}[].")

    walk(Recipe, "")
    return "\n".join(rows)


DOCS_START, DOCS_END = "<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->"


def write_docs(readme: Path) -> None:
    """Replace the key reference between the markers of a docs page (docs/recipes.md) with the schema's."""
    text = readme.read_text()
    head, rest = text.split(DOCS_START)
    _, tail = rest.split(DOCS_END)
    readme.write_text(f"{head}{DOCS_START}\n{recipe_docs()}\n{DOCS_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--docs"]:
        print(recipe_docs())
    elif sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write_docs(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--output"] and len(sys.argv) >= 3:  # for batch scripts: where the run writes
        try:
            print(load_recipe(sys.argv[2], [a for a in sys.argv[3:] if a != "--set"], check_files=False).output)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print("usage: python -m harness.recipe --docs | --write docs/recipes.md | --output RECIPE [--set k=v ...]",
              file=sys.stderr)
        sys.exit(2)
