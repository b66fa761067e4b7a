"""The GPU data path (``data.decode: gpu``): JPEGs decoded in batches on the device.

Workers do not decode: they read the tar sample, check the label, read the image header
(PIL opens lazily: size and mode without decoding) and draw the crop box and flip with the
same per-sample seeding and the same torchvision calls as the CPU path, so a sample is cropped
identically on either path. The batch crosses to the training process still compressed; there
DeviceDecode decodes it in one batched nvJPEG call, crops, resizes and flips on the GPU.

What nvJPEG should not see (PNG and other formats, grey, CMYK or palette JPEGs, JPEGs that may
be truncated) is decoded by PIL in the worker, which ships its RGB pixels instead: exactly the
pixels the CPU path decodes (a re-encode to JPEG would lose some), and cheaper than a re-encode.

Selected by ``data.decode`` (``auto``: on CUDA devices); the CPU path stays the default elsewhere.
"""
from __future__ import annotations

import io
import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from PIL import Image
from torch.nn import functional as nn_functional
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from harness.transforms import (PadCrop, Preprocess, image_bytes, label_in_range, normalize, resized_size, rgb_planes,
                                sample_name, seed_augmentation)

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

        Skips exactly what :func:`harness.transforms.decode_sample` skips, short of JPEG bodies that only fail to
        decode (the decode stage skips those). Anything nvJPEG should not see (PNG, WebP,
        grey, CMYK, palette JPEGs, and JPEGs without an end marker in their last KiB, which
        may be truncated) is decoded here and sent as its RGB pixels, as the CPU path has them.
        The box: ``rrc``, the region of the source image that is resized to the crop; ``cifar``,
        the crop of the image resized to ``image_size`` (shorter side), offsets below 0 or past
        the edge falling into the zero padding.
        """
        where = sample_name(sample)
        pixels = (0, 0)
        try:
            data = image_bytes(sample)
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if image.format != "JPEG" or image.mode != "RGB" or data.rfind(b"\xff\xd9", len(data) - 1024) < 0:
                # decodes (no end marker: maybe truncated, which nvJPEG decodes without a word):
                # a broken body fails here, as on the CPU path
                data, pixels = rgb_planes(image.convert("RGB")), (image.height, image.width)
            label = int(sample["cls"])
        except (StopIteration, KeyError, ValueError, OSError) as e:
            log.warning("skipping unreadable sample %s: %s", where, e)
            return None
        if not label_in_range(label, num_classes, where):
            return None
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
    them early. On the CPU the same code runs inline (torchvision's libjpeg decode): how tests
    run it. ``kind`` (``data.augment.kind``) says how training boxes are applied (see
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
        """One batch on the current stream; samples that fail to decode are dropped and counted."""
        images = self._images(encoded)
        keep = [i for i, image in enumerate(images) if image is not None]
        side = self.pre.image_size
        boxes = encoded.boxes.tolist()
        if self.train and self.kind == "cifar":
            out = torch.zeros(len(keep), 3, side, side, dtype=torch.uint8, device=self.device)
            for n, i in enumerate(keep):
                _paste_window(out[n], self._fit(images[i], side), *boxes[i][:2])
        elif self.train:
            # float from the crop on, rounded once per batch: three kernels an image where
            # TF.resized_crop on uint8 takes six, and the values the CPU path's uint8 crop holds
            out = torch.empty(len(keep), 3, side, side, device=self.device)
            for n, i in enumerate(keep):
                top, left, height, width = boxes[i]
                crop = images[i][None, :, top:top + height, left:left + width].float()
                out[n] = nn_functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False,
                                                   antialias=True)[0]
            out.round_()
        else:
            out = torch.empty(len(keep), 3, side, side, dtype=torch.uint8, device=self.device)
            for n, i in enumerate(keep):
                out[n] = TF.center_crop(self._fit(images[i], self.resize), [side])
        if self.train:
            flip = encoded.flips[keep].nonzero().flatten().tolist()
            if flip:
                index = torch.tensor(flip, device=self.device)
                out[index] = out[index].flip(-1)
        if len(keep) < len(images):
            y = y[keep]
        worker, emitted, skipped = book
        return normalize(out, self.pre), y.to(self.device, non_blocking=True), (worker, emitted, skipped + len(images) - len(keep))

    @staticmethod
    def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
        """Shorter side to ``size`` as ``T.Resize(size)`` (antialiased bilinear); untouched if it is already."""
        return image if min(image.shape[-2:]) == size else TF.resize(image, [size], antialias=True)

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
            for i, image in zip(planes, torch.split(pixels, [len(blobs[i]) for i in planes])):
                images[i] = image.view(3, *sizes[i])
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


def _paste_window(out: torch.Tensor, image: torch.Tensor, top: int, left: int) -> None:
    """Copy the window at (top, left) of ``image`` into the zeroed ``out``; what lies outside the image stays 0."""
    side_h, side_w = out.shape[-2:]
    height, width = image.shape[-2:]
    y0, y1, x0, x1 = max(top, 0), min(top + side_h, height), max(left, 0), min(left + side_w, width)
    if y0 < y1 and x0 < x1:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
