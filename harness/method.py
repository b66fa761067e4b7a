"""The distillation methods as plain PyTorch modules: supervised, KD, SimKD and ATSC.

Each method is an ``nn.Module`` whose ``forward(x, y)`` returns the training loss and its
terms; it knows nothing of DeepSpeed, SLURM or the data pipeline. ``deployed()`` returns the
inference path that is evaluated and exported.

ATSC as ``../shared/ATSC.md`` states it. Per teacher k, with projector P_k and the teacher's
classifier C_k (weight W_k, bias b_k)::

    feature_k = beta * MSE(P_k(h_s), h_t_k)          # h_t_k NOT detached while adapting
    bias_k    = CE(GAP(h_t_k).detach() @ W_k.detach().T + b_k, y)   # fused bias step
    anchor    = w * sum_l ||W_l - W_l0||^2           # applied by the optimizer, see optim.py
    student prediction = sum_k a_k * C_k(GAP(P_k(h_s)))

The anchor's gradient, ``2 w (W - W0)``, is added by the optimizer to exactly the parameters
that :meth:`Distiller.param_groups` marks as anchored (multi-dimensional teacher weights), so
the reference weights live in optimizer state and are partitioned with it under ZeRO.

Labels ``y`` are class indices, or (B, num_classes) probabilities when the batch was mixed
(``data.augment.mixup`` / ``cutmix``: :mod:`harness.data.augment`). Every CE term takes either as
``F.cross_entropy`` does: the supervised and KD terms with ``label_smoothing`` (which smooths
probability targets exactly as timm's ``mixup_target`` would), the bias step without, so a
mixed batch changes what each term sees and nothing else. The teachers see the same mixed x.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.models import linear_classifier

Terms = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- projectors


class ConvProjector(nn.Sequential):
    """SimKD's projector for 4-D feature maps: 1x1, 3x3, 1x1 convolutions (no biases), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        mid = max(out_channels // factor, 1)
        super().__init__(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )


class MLPProjector(nn.Sequential):
    """The same bottleneck for pooled feature vectors (token models, heads with a norm).

    The last layer is a plain linear map: pre-logits after a LayerNorm take negative values,
    which a final ReLU could never reach.
    """

    def __init__(self, in_features: int, out_features: int, factor: int = 2):
        mid = max(out_features // factor, 1)
        super().__init__(
            nn.Linear(in_features, mid, bias=False), nn.BatchNorm1d(mid), nn.ReLU(inplace=True),
            nn.Linear(mid, mid, bias=False), nn.BatchNorm1d(mid), nn.ReLU(inplace=True),
            nn.Linear(mid, out_features),
        )


def align_maps(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SimKD's spatial alignment: the larger map is average-pooled to the smaller one's size."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-2] > teacher.shape[-2]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


def pooled(features: torch.Tensor) -> torch.Tensor:
    return features.mean((2, 3)) if features.dim() == 4 else features


# ----------------------------------------------------------------------------- loss terms


def feature_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in fp32."""
    return F.mse_loss(projected.float(), target.float())


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher || student) at temperature T, scaled by T^2, batch mean, fp32."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.softmax(teacher_logits.float().detach() / t, -1),
                    reduction="batchmean") * t * t


def bias_only_loss(teacher_pooled: torch.Tensor, classifier: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """CE of the teacher classifier with everything but its bias detached: moves only b_c.

    ``labels``: class indices, or a mixed batch's probabilities (Mixup/CutMix), whose CE is what
    the authors' loss computes on a mixed batch; unsmoothed either way, as the authors' is.
    """
    logits = F.linear(teacher_pooled.detach().float(), classifier.weight.detach().float(), classifier.bias.float())
    return F.cross_entropy(logits, labels)


def teacher_logits_of(features: torch.Tensor, classifier: nn.Linear) -> torch.Tensor:
    """The teacher's prediction from its distillation feature, in fp32, as the bias step computes it."""
    bias = classifier.bias.detach().float() if classifier.bias is not None else None
    return F.linear(pooled(features).detach().float(), classifier.weight.detach().float(), bias)


def teacher_fit(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's own CE and top-1 on a training batch (probability labels: their argmax), for watching it.

    ``logits``: detached fp32 (:func:`teacher_logits_of`). Unsmoothed, as the bias step's CE is: in
    fused mode the CE is that term's value.
    """
    target = labels if labels.dim() == 1 else labels.argmax(-1)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == target).float().mean()


# ----------------------------------------------------------------------------- features


class FeatureTap:
    """How to read one model's distillation feature: its last 4-D map, or its pooled pre-logits."""

    def __init__(self, kind: str):
        assert kind in ("map", "vector")
        self.kind = kind

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's distillation feature for input x."""
        raw = model.forward_features(x)
        return raw if self.kind == "map" else model.forward_head(raw, pre_logits=True)


# ----------------------------------------------------------------------------- teacher inputs


class InputView(nn.Module):
    """A teacher's view of the student's input: the same crop, resized and renormalised for it.

    Input is normalised with the student's mean/std; a teacher trained with another mean/std
    or resolution gets ``(x * std_s + mean_s - mean_t) / std_t``, resized to its side. The
    identity when nothing differs.
    """

    def __init__(self, student_pre, teacher_pre):
        super().__init__()
        s_mean, s_std = torch.tensor(student_pre.mean), torch.tensor(student_pre.std)
        t_mean, t_std = torch.tensor(teacher_pre.mean), torch.tensor(teacher_pre.std)
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.renormalise = not (torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std))
        self.size = teacher_pre.image_size if teacher_pre.image_size != student_pre.image_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x * self.scale + self.shift if self.renormalise else x


class ViewedTeacher(nn.Module):
    """A teacher with its input view, for evaluating it on the student's input batches."""

    def __init__(self, view: InputView, teacher: nn.Module):
        super().__init__()
        self.view, self.teacher = view, teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.view(x))


# ----------------------------------------------------------------------------- methods


class Distiller(nn.Module):
    """Common interface of the methods; subclasses define ``forward`` and ``deployed``."""

    student: nn.Module
    teachers: nn.ModuleList

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module] = (), views: Sequence[nn.Module] = ()):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.views = nn.ModuleList(views or [nn.Identity() for _ in teachers])

    def viewed_teachers(self) -> list[nn.Module]:
        """Each teacher behind its input view: what evaluating a teacher on student batches needs."""
        return [ViewedTeacher(v, t) for v, t in zip(self.views, self.teachers)]

    # Whether the teachers are being adapted (trained). Frozen teachers run in eval mode under
    # no_grad: exactly SimKD / KD, no teacher graph, no teacher gradients.
    adapting: bool = False
    # While adapting: teachers the guard froze (eval mode; their lr is 0: harness/teacher_guard.py),
    # and whether BatchNorm keeps its running statistics (``method.teacher_bn`` eval / frozen).
    held: frozenset = frozenset()
    teacher_bn_eval: bool = False

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for k, teacher in enumerate(self.teachers):
            teacher.train(mode and self.adapting and k not in self.held)
            if self.teacher_bn_eval:
                for module in teacher.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def hold_teacher(self, k: int) -> None:
        """Teacher k stays as it is from now on: eval mode (the optimizer's side: optim.freeze_teacher)."""
        self.held = self.held | {k}
        self.train(self.training)

    def set_adapting(self, adapting: bool) -> None:
        self.adapting = adapting
        self.train(self.training)

    def teacher_forward(self, k: int, tap: FeatureTap, x: torch.Tensor):
        with torch.set_grad_enabled(self.adapting and torch.is_grad_enabled()):
            return tap(self.teachers[k], self.views[k](x))

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups, each tagged with its role (see optim.build_optimizer)."""
        return [{"params": [p for p in self.student_side() if p.requires_grad], "role": "student"}]

    def student_side(self) -> Iterator[nn.Parameter]:
        return self.student.parameters()

    def parts(self) -> list[nn.Module]:
        """The student, each teacher and the method's own modules: each names its own parameters
        (a timm model's ``no_weight_decay()`` is relative to the model)."""
        own = [m for name, m in self.named_children() if name not in ("student", "teachers")]
        return [self.student, *self.teachers, *own]

    def bias_parameters(self) -> list[nn.Parameter]:
        """Classifier biases stepped by the separate bias step (two-pass mode only)."""
        return []

    def deployed(self) -> nn.Module:
        raise NotImplementedError


class Supervised(Distiller):
    """The student alone with cross-entropy; also how a teacher is trained for later runs."""

    def __init__(self, student: nn.Module, label_smoothing: float = 0.0):
        super().__init__(student)
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        ce = F.cross_entropy(self.student(x).float(), y, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce}

    def deployed(self) -> nn.Module:
        return self.student


class KD(Distiller):
    """Hinton et al.: ce_weight * CE + alpha * T^2 KL(teacher || student); the teacher is frozen."""

    def __init__(self, student: nn.Module, teacher: nn.Module, alpha: float, temperature: float,
                 ce_weight: float, label_smoothing: float = 0.0, view: Optional[nn.Module] = None):
        super().__init__(student, [teacher], [view] if view is not None else ())
        teacher.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teachers[0](self.views[0](x))
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        kl = kl_loss(logits, teacher_logits, self.temperature)
        return self.ce_weight * ce + self.alpha * kl, {"ce": ce, "kl": kl}

    def deployed(self) -> nn.Module:
        return self.student


class SharedClassifierStudent(nn.Module):
    """The deployed SimKD/ATSC student: backbone, per-teacher projectors and teacher classifiers.

    logits = sum_k a_k * C_k(GAP(P_k(h_s))), with h_s aligned to teacher k's map size when both
    are maps. This is the path evaluated during training and exported for inference.
    """

    def __init__(self, backbone: nn.Module, projectors: nn.ModuleList, classifiers: nn.ModuleList,
                 student_taps: Sequence[str], teacher_sizes: Sequence[Optional[tuple[int, int]]],
                 teacher_weights: Sequence[float]):
        super().__init__()
        self.backbone, self.projectors, self.classifiers = backbone, projectors, classifiers
        self.student_taps = list(student_taps)
        self.teacher_sizes = [tuple(s) if s else None for s in teacher_sizes]
        total = float(sum(teacher_weights))
        self.teacher_weights = [w / total for w in teacher_weights]

    def project(self, raw: torch.Tensor, k: int) -> torch.Tensor:
        """P_k applied to the student's raw forward_features output, aligned to teacher k."""
        if self.student_taps[k] == "map":
            size = self.teacher_sizes[k]
            source = raw if size is None or raw.shape[-2] <= size[0] else F.adaptive_avg_pool2d(raw, size)
            return self.projectors[k](source)
        return self.projectors[k](self.backbone.forward_head(raw, pre_logits=True))

    def logits_from_projected(self, projected: Sequence[torch.Tensor]) -> torch.Tensor:
        out = 0
        for k, z in enumerate(projected):
            out = out + self.teacher_weights[k] * self.classifiers[k](pooled(z))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.backbone.forward_features(x)
        return self.logits_from_projected([self.project(raw, k) for k in range(len(self.projectors))])


class SharedClassifier(Distiller):
    """The student predicts through the teachers' classifiers: SimKD (teachers frozen) and ATSC
    (teachers adapted, ``adapting=True``), one module for both.

    Args:
        student / teachers: timm models; every teacher's final classifier is reused by the student.
        taps: 'map' or 'vector' per teacher, from ``models.feature_kind`` of teacher and student.
        teacher_sizes: each 'map' teacher's feature-map (H, W) at the training resolution.
        feature_weight (beta), ce_weight (c), kd_weight (d), temperature: ATSC.md section 2.
        fused_bias: compute the bias-only CE from the same teacher forward (default); False
            leaves it to a separate step (``bias_loss``), the authors' two-pass order.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], taps: Sequence[str],
                 student_dims: Sequence[int], teacher_dims: Sequence[int],
                 teacher_sizes: Sequence[Optional[tuple[int, int]]], teacher_weights: Sequence[float], *,
                 factor: int = 2, feature_weight: float = 1.0, ce_weight: float = 0.0, kd_weight: float = 0.0,
                 temperature: float = 4.0, fused_bias: bool = True, adapt: bool = False,
                 label_smoothing: float = 0.0, views: Sequence[nn.Module] = (), teacher_bn: str = "train",
                 anchor_scope: str = "weights"):
        super().__init__(student, teachers, views)
        projectors = nn.ModuleList(
            ConvProjector(s, t, factor) if tap == "map" else MLPProjector(s, t, factor)
            for tap, s, t in zip(taps, student_dims, teacher_dims))
        classifiers = nn.ModuleList(linear_classifier(t) for t in teachers)  # shared, not copied
        self.taps = [FeatureTap(kind) for kind in taps]
        self.feature_weight, self.ce_weight, self.kd_weight = feature_weight, ce_weight, kd_weight
        self.temperature, self.fused_bias, self.label_smoothing = temperature, fused_bias, label_smoothing
        self.can_adapt, self.anchor_scope = adapt, anchor_scope
        self.teacher_bn_eval = adapt and teacher_bn != "train"
        if not adapt:
            for t in teachers:
                t.requires_grad_(False)
        elif teacher_bn == "frozen":  # scales and shifts stay as loaded: out of the optimizer and the reduction
            for t in teachers:
                for module in t.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.requires_grad_(False)
        if not (ce_weight or kd_weight):
            # no loss term reaches the student's own head: frozen, so no optimizer or gradient
            # reduction carries it (it stays in the student's weights and in the export)
            student.get_classifier().requires_grad_(False)
        self.projectors = projectors
        # The deployed path is a view over modules this distiller already owns (the classifiers
        # are teacher submodules); it is kept unregistered so no parameter has two owners.
        object.__setattr__(self, "shared", SharedClassifierStudent(
            student, projectors, classifiers, taps, teacher_sizes, teacher_weights))

    def student_side(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield from self.projectors.parameters()

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if not self.can_adapt:
            return groups
        biases = {id(p) for p in self.bias_parameters()} if not self.fused_bias else set()
        # Two groups per teacher, tagged with its index: the optimizer tracks each teacher's
        # distance from W0 on its own (the step is the same as with all teachers in one group).
        # ``anchor_scope: all`` puts every parameter in the anchored group (the other stays empty).
        for k, teacher in enumerate(self.teachers):
            params = [p for p in teacher.parameters() if id(p) not in biases and p.requires_grad]
            anchored = [p.dim() > 1 or self.anchor_scope == "all" for p in params]
            groups.append({"params": [p for p, a in zip(params, anchored) if a], "role": "teacher", "anchor": True,
                           "teacher": k})
            groups.append({"params": [p for p, a in zip(params, anchored) if not a], "role": "teacher",
                           "anchor": False, "teacher": k})
        return groups

    def bias_parameters(self) -> list[nn.Parameter]:
        return list(self.biases_by_teacher().values())

    def biases_by_teacher(self) -> dict[int, nn.Parameter]:
        return {k: c.bias for k, c in enumerate(self.shared.classifiers) if c.bias is not None}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        raw_s = self.student.forward_features(x)
        projected, teacher_logits, terms = [], [], {}
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for k, tap in enumerate(self.taps):
            h_t = self.teacher_forward(k, tap, x)
            classifier = self.shared.classifiers[k]
            if self.adapting:
                with torch.no_grad():  # the teacher's own prediction, watched while it adapts (harness/teacher_guard.py)
                    terms[f"teacher{k}_ce"], terms[f"teacher{k}_top1"] = teacher_fit(teacher_logits_of(h_t, classifier), y)
            z = self.shared.project(raw_s, k)
            if z.dim() == 4:
                z, h_t = align_maps(z, h_t)
            projected.append(z)
            terms[f"feature{k}"] = feature_loss(z, h_t)
            loss = loss + self.feature_weight * terms[f"feature{k}"]
            if self.adapting and self.fused_bias and classifier.bias is not None:
                terms[f"bias{k}"] = bias_only_loss(pooled(h_t), classifier, y)
                loss = loss + terms[f"bias{k}"]
            if self.adapting:
                # W_k gets no gradient from the loss; an exact zero one instead changes no step (the
                # optimizer treats a missing one as zero: ATSC.md section 2) but gives every engine a
                # gradient to reduce: compiled, DeepSpeed's stage-2 hook asserts on a None gradient,
                # and data-parallel reduction needs no search for unused parameters
                loss = loss + 0.0 * classifier.weight.sum()
            if self.kd_weight:
                with torch.no_grad():
                    teacher_logits.append(classifier(pooled(h_t)))
        if self.ce_weight or self.kd_weight:
            own = self.student.forward_head(raw_s)
            if self.ce_weight:
                terms["ce"] = F.cross_entropy(own.float(), y, label_smoothing=self.label_smoothing)
                loss = loss + self.ce_weight * terms["ce"]
            if self.kd_weight:
                weights = self.shared.teacher_weights
                terms["kl"] = sum(weights[k] * kl_loss(own, tl, self.temperature) for k, tl in enumerate(teacher_logits))
                loss = loss + self.kd_weight * terms["kl"]
        return loss, terms

    def bias_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The authors' second pass: a fresh teacher forward whose CE can move only the biases."""
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        for teacher, view, tap, classifier in zip(self.teachers, self.views, self.taps, self.shared.classifiers):
            with torch.no_grad():
                h_t = tap(teacher, view(x))
            total = total + bias_only_loss(pooled(h_t), classifier, y)
        return total

    def deployed(self) -> nn.Module:
        return self.shared
