"""The GPU data path (``data.decode: gpu``): JPEGs decoded in batches on the device.

Workers do not decode: they read the tar sample, check the label, read the image header
(PIL opens lazily: size and mode without decoding) and draw the crop box and flip with the
same per-sample seeding and the same torchvision calls as the CPU path, so a sample is cropped
identically on either path. The batch crosses to the training process still compressed; there
DeviceDecode decodes it in one batched nvJPEG call, then crops, resizes and flips the whole
batch in a fixed number of device operations (:func:`resample`): per-image host work, not the
GPU, is what limited this path.

What nvJPEG should not see (PNG and other formats, grey, CMYK or palette JPEGs, JPEGs that may
be truncated) is decoded by PIL in the worker, which ships its RGB pixels instead: exactly the
pixels the CPU path decodes (a re-encode to JPEG would lose some), and cheaper than a re-encode.

Selected by ``data.decode`` (``auto``: on CUDA devices); the CPU path stays the default elsewhere.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from harness.data.transforms import (PadCrop, Preprocess, normalize, read_sample, resized_size, rgb_planes,
                                     seed_augmentation)

log = logging.getLogger("harness.data")


class Encoded(NamedTuple):
    """A batch as the GPU path's workers hand it over: compressed bytes and what to do with them.

    The bytes travel as one tensor (one shared-memory block per batch, not one per image).
    """

    data: torch.Tensor  # every sample's JPEG bytes (or RGB planes, see `pixels`), concatenated (uint8)
    lengths: torch.Tensor  # (N,) bytes per sample
    boxes: torch.Tensor  # (N, 4) top, left, height, width of the crop (training; see DeferredDecode.plan)
    flips: torch.Tensor  # (N,) bool: flip horizontally after the crop (training)
    where: tuple[str, ...]  # shard:key per sample, to name one that fails to decode
    pixels: torch.Tensor  # (N, 2) height, width of a sample sent as decoded RGB planes; (0, 0): a JPEG


class Planned(NamedTuple):
    """One sample as a GPU path worker plans it."""

    data: bytes | bytearray  # the JPEG, or the decoded RGB planes (CHW) when `pixels` is not (0, 0)
    box: tuple[int, int, int, int]
    flip: bool
    label: int
    where: str
    pixels: tuple[int, int]


def _for_nvjpeg(data: bytes) -> tuple[bytes, Image.Image, tuple[int, int]]:
    """What a worker sends for one image: its JPEG bytes as they are, or (anything nvJPEG should not
    see) its RGB pixels; the image (header read) and the pixels' (height, width), (0, 0) for bytes."""
    image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    # (max: a negative start counts from the end, which would skip the marker of a 1023-byte JPEG)
    if image.format != "JPEG" or image.mode != "RGB" or data.rfind(b"\xff\xd9", max(len(data) - 1024, 0)) < 0:
        # decodes (no end marker: maybe truncated, which nvJPEG decodes without a word):
        # a broken body fails here, as on the CPU path
        return rgb_planes(image.convert("RGB")), image, (image.height, image.width)
    return data, image, (0, 0)


class DeferredDecode:
    """The GPU path's worker half, passed to :class:`ShardStream` in place of a transform.

    ``crop`` (train): the RandomResizedCrop scale and ratio ranges and the flip probability;
    None (eval): no randomness, the decode stage resizes and center-crops like
    :func:`eval_transform`. ``kind`` is ``data.augment.kind``: ``rrc`` draws RandomResizedCrop
    boxes, ``cifar`` the :class:`PadCrop` box of ``padding`` (the crop ranges unused).
    """

    def __init__(self, pre: Preprocess, crop: Optional[tuple[Sequence[float], Sequence[float], float]] = None,
                 kind: str = "rrc", padding: int = 4):
        self.pre, self.kind = pre, kind
        self.train = crop is not None
        if crop is not None:
            scale, ratio, self.hflip = crop
            # the CPU path's transform classes, so their get_params and ranges are used as they are
            self.rrc = T.RandomResizedCrop(pre.image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)
            self.pad_crop = PadCrop(pre.image_size, padding)

    def plan(self, sample: dict, num_classes: int, seed: int) -> Optional[Planned]:
        """(bytes, crop box, flip, label, shard:key, pixels) of one tar sample, or None (logged).

        Skips exactly what :func:`harness.data.transforms.decode_sample` skips, short of JPEG bodies that only fail to
        decode (the decode stage skips those). Anything nvJPEG should not see (PNG, WebP,
        grey, CMYK, palette JPEGs, and JPEGs without an end marker in their last KiB, which
        may be truncated) is decoded here and sent as its RGB pixels, as the CPU path has them.
        The box: ``rrc``, the region of the source image that is resized to the crop; ``cifar``,
        the crop of the image resized to ``image_size`` (shorter side), offsets below 0 or past
        the edge falling into the zero padding.
        """
        found = read_sample(sample, num_classes, _for_nvjpeg)
        if found is None:
            return None
        (data, image, pixels), label, where = found
        if not self.train:
            return Planned(data, (0, 0, image.height, image.width), False, label, where, pixels)
        # Same generator state, same calls in the same order as the CPU path's transform
        # (RandomResizedCrop.forward or PadCrop, then RandomHorizontalFlip.forward): the same box and flip.
        seed_augmentation(sample, seed)
        if self.kind == "cifar":
            box = self.pad_crop.box(*resized_size(image.height, image.width, self.pre.image_size))
        else:
            box = self.rrc.get_params(image, self.rrc.scale, self.rrc.ratio)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        return Planned(data, box, flip, label, where, pixels)

    @staticmethod
    def collate(items: list[Planned]) -> tuple[Encoded, torch.Tensor]:
        data = torch.frombuffer(bytearray().join(item.data for item in items), dtype=torch.uint8)
        return (Encoded(data, torch.tensor([len(item.data) for item in items]),
                        torch.tensor([item.box for item in items]), torch.tensor([item.flip for item in items]),
                        tuple(item.where for item in items), torch.tensor([item.pixels for item in items])),
                torch.tensor([item.label for item in items], dtype=torch.long))


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's (nvJPEG on CUDA) batched decode to RGB; raises RuntimeError on a bad one."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; this is the one call to move
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


class DeviceDecode:
    """The GPU path's device half: decode, crop, resize, flip and normalise on the device.

    torchvision's nvJPEG call holds the calling thread until its batch is decoded (it
    synchronises its own stream), so on CUDA a background thread decodes the next batch, on a
    side stream, while the training thread launches the step on the current one (the GIL is
    released inside the decode). Each batch is handed over with an event the trainer's stream
    waits on, and its tensors are marked as used by that stream so the allocator cannot recycle
    them early. On the CPU the same code runs inline (torchvision's libjpeg decode, one call
    per image) and finishes the batch with the same :func:`resample`: how tests and
    ``bench/gpu_data.py --stage`` run it. ``kind`` (``data.augment.kind``) says how training boxes are applied (see
    :meth:`DeferredDecode.plan`).
    """

    def __init__(self, pre: Preprocess, device: torch.device, train: bool, kind: str = "rrc"):
        self.pre, self.device, self.train, self.kind = pre, torch.device(device), train, kind
        self.resize = int(math.floor(pre.image_size / pre.crop_pct))  # as eval_transform

    def __call__(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        if self.device.type != "cuda":
            for encoded, y, book in batches:
                yield self._finish(encoded, y, book)
            return
        side = torch.cuda.Stream(self.device)

        def produce():  # in the decode thread: the next batch from the workers, finished on the side stream
            item = next(batches, None)
            if item is None:
                return None
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                x, y, book = self._finish(*item)
                return x, y, book, side.record_event()

        pool = ThreadPoolExecutor(1, thread_name_prefix="gpu-decode")
        try:
            ahead = pool.submit(produce)
            while (done := ahead.result()) is not None:
                ahead = pool.submit(produce)  # one batch ahead: decoded while the trainer uses this one
                yield self._hand_over(*done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _hand_over(self, x: torch.Tensor, y: torch.Tensor, book: tuple, ready: torch.cuda.Event):
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        x.record_stream(stream)
        y.record_stream(stream)
        return x, y, book

    def _finish(self, encoded: Encoded, y: torch.Tensor, book: tuple[int, int, int]):
        """One batch on the current stream; samples that fail to decode are dropped and counted.

        After the decode, a fixed number of operations per batch whatever its size (see
        :func:`resample`): the per-sample work left is Python arithmetic on the boxes.
        """
        images = self._images(encoded)
        keep = [i for i, image in enumerate(images) if image is not None]
        boxes, flips = encoded.boxes.tolist(), encoded.flips.tolist()
        windows = [self._window(*images[i].shape[-2:], boxes[i], self.train and flips[i]) for i in keep]
        out = resample([images[i] for i in keep], windows, self.pre.image_size, self.device)
        if len(keep) < len(images):
            y = y[keep]
        worker, emitted, skipped = book
        skipped += len(images) - len(keep)
        return normalize(out, self.pre), y.to(self.device, non_blocking=True), (worker, emitted, skipped)

    def _window(self, height: int, width: int, box: Sequence[int], flip: bool) -> Window:
        """What one sample's output shows, as the CPU path's transform for this mode has it.

        Training (``rrc``): the box, resized to the output square. ``cifar``: the image with its
        shorter side resized to the output side (``T.Resize``), seen through the box, which may
        reach into the zero padding. Evaluation: the shorter side resized to ``image_size /
        crop_pct``, then the center square with ``T.CenterCrop``'s rounding.
        """
        side = self.pre.image_size
        if self.train and self.kind != "cifar":
            top, left, box_height, box_width = box
            return Window((top, box_height, side, 0), (left, box_width, side, 0), flip)
        resized_height, resized_width = resized_size(height, width, side if self.train else self.resize)
        if self.train:
            top, left = box[0], box[1]
        else:
            top, left = _center_offset(resized_height, side), _center_offset(resized_width, side)
        return Window((0, height, resized_height, top), (0, width, resized_width, left), flip)

    def _images(self, encoded: Encoded) -> list[Optional[torch.Tensor]]:
        """The batch's RGB images (CHW uint8) on the device; None for a JPEG that does not decode."""
        blobs = list(torch.split(encoded.data, encoded.lengths.tolist()))
        sizes = [tuple(size) for size in encoded.pixels.tolist()]
        images: list[Optional[torch.Tensor]] = [None] * len(blobs)
        jpegs = [i for i, size in enumerate(sizes) if size == (0, 0)]
        if jpegs:
            for i, image in zip(jpegs, self._decode([blobs[i] for i in jpegs], [encoded.where[i] for i in jpegs])):
                images[i] = image
        planes = [i for i, size in enumerate(sizes) if size != (0, 0)]
        if planes:  # decoded in the worker: one copy to the device for all of them
            pixels = torch.cat([blobs[i] for i in planes]).to(self.device, non_blocking=True)
            for i, image in zip(planes, _planes_as_images(pixels, [sizes[i] for i in planes])):
                images[i] = image
        return images

    def _decode(self, blobs: list[torch.Tensor], where: Sequence[str]) -> list[Optional[torch.Tensor]]:
        try:
            return list(_decode_jpegs(blobs, self.device))
        except RuntimeError:
            pass  # some image in the batch is bad: find it, keep the rest
        images: list[Optional[torch.Tensor]] = []
        for blob, name in zip(blobs, where):
            image, error = None, None
            for device in dict.fromkeys((self.device, torch.device("cpu"))):
                try:
                    image = _decode_jpegs([blob], device)[0].to(self.device)
                    break
                except RuntimeError as e:
                    error = e
            if image is None:
                log.warning("skipping undecodable JPEG %s: %s", name, str(error).splitlines()[-1][:200])
            elif error is not None:  # nvJPEG refused what libjpeg reads: kept, as the CPU path would
                log.warning("decoded %s on the CPU: nvJPEG refused it (%s)", name, str(error).splitlines()[-1][:200])
            images.append(image)
        return images


class Window(NamedTuple):
    """Where one output image's pixels come from, per axis, and whether it is mirrored.

    Per axis, ``(start, length, resized, offset)``: the source span ``[start, start + length)``
    is resized (antialiased bilinear) to ``resized`` pixels, of which the output shows those from
    ``offset`` on; output pixels outside the resized span are 0 (padding).
    """

    rows: tuple[int, int, int, int]
    cols: tuple[int, int, int, int]
    flip: bool


def _center_offset(length: int, side: int) -> int:
    """Offset of ``T.CenterCrop(side)``'s window in ``length`` pixels (negative: zero padding around it)."""
    return int(round((length - side) / 2.0)) if length >= side else -((side - length) // 2)


def resample(images: Sequence[torch.Tensor], windows: Sequence[Window], side: int,
             device: torch.device) -> torch.Tensor:
    """Crop, resize, flip and pad every image of a batch at once: ``(N, 3, side, side)`` float.

    Antialiased bilinear resizing is separable and linear, so each output is ``Wy @ image @ Wx.T``
    per channel, with ``Wy``, ``Wx`` the filter's weights for that image's window (a row per
    output pixel, zero outside the window: the crop, the flip and the padding are in the weights).
    The images are padded into one tensor (a nested tensor: one operation however many images)
    and both products are batched matrix products, so the number of operations does not grow
    with the batch. The values are torch's ``F.interpolate(..., antialias=True)`` on the float
    crop, rounded to whole levels once, as the CPU path's uint8 images are. Images of very
    different sizes are padded in a few groups of similar size (:func:`_size_groups`), so one
    large image does not pad the whole batch to its size.
    """
    if not images:
        return torch.empty(0, 3, side, side, device=device)
    groups = _size_groups([tuple(image.shape[-2:]) for image in images])
    outs = []
    for group in groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # strided nested tensors are a "prototype"
            padded = torch.nested.to_padded_tensor(
                torch.nested.as_nested_tensor([images[i] for i in group], dtype=torch.float32), 0.0)
        n, _, height, width = padded.shape
        plan = torch.tensor([(*windows[i].rows, *windows[i].cols, windows[i].flip) for i in group],
                            dtype=torch.float64, device=device)
        rows = _axis_weights(plan[:, 0:4], None, side, height)
        cols = _axis_weights(plan[:, 4:8], plan[:, 8] > 0, side, width)
        across = _matmul(padded.view(n, 3 * height, width), cols.transpose(1, 2), whole_a=True)  # (n, 3 * height, side)
        outs.append(_matmul(rows.unsqueeze(1), across.view(n, 3, height, side)))
    if len(outs) == 1:
        return outs[0].round_()
    order = [i for group in groups for i in group]
    back = sorted(range(len(order)), key=order.__getitem__)  # where each sample landed in the groups' order
    return torch.cat(outs)[torch.tensor(back, device=device)].round_()


def _axis_weights(axis: torch.Tensor, flip: Optional[torch.Tensor], side: int, length: int) -> torch.Tensor:
    """``(n, side, length)`` float32: row i holds output pixel i's weights of source pixels 0 .. length - 1.

    ``axis``: ``(n, 4)`` float64 rows of :class:`Window`'s (start, length, resized, offset);
    ``flip``: ``(n,)`` bool, output pixels in reverse order. The filter is torch's antialiased
    bilinear one (PIL's, ``F.interpolate(..., antialias=True)``): for output pixel p of the
    resized span, a triangle of half-width ``max(scale, 1)`` source pixels around
    ``scale * (p + 0.5)``, cut to the source pixels torch takes, normalised to sum 1.
    """
    start, span, resized, offset = axis.unbind(1)
    scale = span / resized
    support = scale.clamp(min=1)
    index = torch.arange(side, dtype=torch.float64, device=axis.device).expand(len(axis), side)
    if flip is not None:
        index = torch.where(flip[:, None], side - 1 - index, index)
    position = index + offset[:, None]  # the output pixel's place in the resized span
    center = scale[:, None] * (position + 0.5)  # ... and its centre in the source span
    # torch's taps: [int(center - support + 0.5), int(center + support + 0.5)) within the span
    first = (center - support[:, None] + 0.5).floor().clamp(min=0)
    stop = torch.minimum((center + support[:, None] + 0.5).floor(), span[:, None])
    inside = (position >= 0) & (position < resized[:, None])  # outside: padding, no weights
    # distances in float32, from an exact integer part and a float64-accurate fraction, so the
    # (n, side, length) tensors are float32 yet as precise as the float64 centres
    shift = center - 0.5
    whole = shift.floor()
    source = (torch.arange(length, dtype=torch.float64, device=axis.device) - start[:, None]).float()[:, None, :]
    distance = source - whole.float()[..., None] - (shift - whole).float()[..., None]
    weights = (1 - distance.abs() * (1 / support).float()[:, None, None]).clamp_(min=0)
    weights *= (source >= first.float()[..., None]) & (source < stop.float()[..., None]) & inside[..., None]
    return weights / weights.sum(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)


def _matmul(a: torch.Tensor, b: torch.Tensor, whole_a: bool = False) -> torch.Tensor:
    """``a @ b`` to float32 precision even where float32 products run in TF32, as the trainer sets on CUDA.

    TF32 keeps 10 of float32's 23 mantissa bits: enough for the pixels (whole levels, ``whole_a``),
    not for the weights or the first product, which would drift by up to a level (measured with
    TF32's truncation emulated: a mean of 0.13 levels, biased low). Each operand is split into a
    part TF32 holds exactly and the remainder, and the products that matter are summed
    ("3xTF32"; two products when ``a`` is exact already): errors of about 2**-20 instead.
    """
    if torch.get_float32_matmul_precision() == "highest":
        return torch.matmul(a, b)
    b_high = _tf32_part(b)
    if whole_a:
        return torch.matmul(a, b_high) + torch.matmul(a, b - b_high)
    a_high = _tf32_part(a)
    return torch.matmul(a_high, b_high) + torch.matmul(a - a_high, b_high) + torch.matmul(a_high, b - b_high)


def _tf32_part(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _size_groups(sizes: Sequence[tuple[int, int]], waste: float = 4.0, most: int = 4) -> list[list[int]]:
    """Indices of the images, in at most ``most`` groups that pad cheaply to their largest height and width.

    One group unless padding the whole batch to its largest height and width would hold more
    than ``waste`` times the pixels it has (ImageNet's 500x375-like batches: about 1.4 times);
    then groups of area within a factor ``waste`` of each other, counted down from the largest,
    the last group taking the rest. The number of groups, hence of operations, stays bounded.
    """
    areas = [height * width for height, width in sizes]
    padded = len(sizes) * max(height for height, _ in sizes) * max(width for _, width in sizes)
    if padded <= waste * sum(areas):
        return [list(range(len(sizes)))]
    largest, groups = max(areas), {}
    for i, area in enumerate(areas):
        groups.setdefault(min(int(math.log(largest / area, waste)), most - 1), []).append(i)
    return [groups[k] for k in sorted(groups)]


def _planes_as_images(pixels: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Consecutive CHW RGB images in one flat buffer, as ``(3, height, width)`` views, in one operation.

    A nested-tensor view of the buffer (what ``torch.nested.as_nested_tensor`` builds from a
    regular tensor), unbound: not one ``view`` per image.
    """
    shape = torch.tensor([(3, height, width) for height, width in sizes])
    strides = torch.tensor([(height * width, width, 1) for height, width in sizes])
    offsets = torch.tensor(list(itertools.accumulate((3 * height * width for height, width in sizes[:-1]), initial=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._nested_view_from_buffer(pixels, shape, strides, offsets).unbind()


class CountOps(TorchDispatchMode):
    """Counts the operations dispatched while active (aten's, and torchvision's ``image`` ops):
    the measure of the decode stage's host work per batch (bench/gpu_data.py --stage, its tests)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
