"""The GPU data path (``data.decode: gpu``): JPEGs decoded in batches on the device.

Workers do not decode: they read the tar sample, check the label, read the image header
(PIL opens lazily: size and mode without decoding) and draw the crop box and flip with the
same per-sample seeding and the same torchvision calls as the CPU path, so a sample is cropped
identically on either path. The batch crosses to the training process still compressed; there
DeviceDecode decodes it in one batched nvJPEG call, crops, resizes and flips on the GPU.

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

from harness.transforms import Preprocess, image_bytes, label_in_range, normalize, sample_name, seed_augmentation

log = logging.getLogger("harness.data")


class Encoded(NamedTuple):
    """A batch as the GPU path's workers hand it over: compressed bytes and what to do with them.

    The JPEG bytes travel as one tensor (one shared-memory block per batch, not one per image).
    """

    data: torch.Tensor  # every sample's JPEG bytes, concatenated (uint8)
    lengths: torch.Tensor  # (N,) bytes per sample
    boxes: torch.Tensor  # (N, 4) top, left, height, width of the crop in the source image (training)
    flips: torch.Tensor  # (N,) bool: flip horizontally after the crop (training)
    where: tuple[str, ...]  # shard:key per sample, to name one that fails to decode


class DeferredDecode:
    """The GPU path's worker half, passed to :class:`ShardStream` in place of a transform.

    ``crop`` (train): the RandomResizedCrop scale and ratio ranges and the flip probability;
    None (eval): no randomness, the decode stage resizes and center-crops like
    :func:`eval_transform`.
    """

    def __init__(self, pre: Preprocess, crop: Optional[tuple[Sequence[float], Sequence[float], float]] = None):
        self.pre = pre
        self.train = crop is not None
        if crop is not None:
            scale, ratio, self.hflip = crop
            # the CPU path's own transform object, so its get_params and ranges are used as they are
            self.rrc = T.RandomResizedCrop(pre.image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)

    def plan(self, sample: dict, num_classes: int, seed: int) -> Optional[tuple[bytes, tuple[int, int, int, int], bool, int, str]]:
        """(JPEG bytes, crop box, flip, label, shard:key) of one tar sample, or None (logged).

        Skips exactly what :func:`harness.transforms.decode_sample` skips, short of JPEG bodies that only fail to
        decode (the decode stage skips those). Anything nvJPEG should not see (PNG, WebP,
        grey, CMYK, palette JPEGs, and JPEGs without an end marker in their last KiB, which
        may be truncated) is decoded and re-encoded here as an RGB JPEG, quality 95, 4:4:4.
        """
        where = sample_name(sample)
        try:
            data = image_bytes(sample)
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if image.format != "JPEG" or image.mode != "RGB" or data.rfind(b"\xff\xd9", len(data) - 1024) < 0:
                # decodes (no end marker: maybe truncated, which nvJPEG decodes without a word):
                # a broken body fails here, as on the CPU path
                data = _rgb_jpeg(image)
            label = int(sample["cls"])
        except (StopIteration, KeyError, ValueError, OSError) as e:
            log.warning("skipping unreadable sample %s: %s", where, e)
            return None
        if not label_in_range(label, num_classes, where):
            return None
        if not self.train:
            return data, (0, 0, image.height, image.width), False, label, where
        # Same generator state, same calls in the same order as the CPU path's transform
        # (RandomResizedCrop.forward, then RandomHorizontalFlip.forward): the same box and flip.
        seed_augmentation(sample, seed)
        box = self.rrc.get_params(image, self.rrc.scale, self.rrc.ratio)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        return data, box, flip, label, where

    @staticmethod
    def collate(items: list[tuple]) -> tuple[Encoded, torch.Tensor]:
        data = torch.frombuffer(bytearray().join(item[0] for item in items), dtype=torch.uint8)
        return (Encoded(data, torch.tensor([len(item[0]) for item in items]), torch.tensor([item[1] for item in items]),
                        torch.tensor([item[2] for item in items]), tuple(item[4] for item in items)),
                torch.tensor([item[3] for item in items], dtype=torch.long))


def _rgb_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


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
    run it.
    """

    def __init__(self, pre: Preprocess, device: torch.device, train: bool):
        self.pre, self.device, self.train = pre, torch.device(device), train
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
        images = self._decode(list(torch.split(encoded.data, encoded.lengths.tolist())), encoded.where)
        keep = [i for i, image in enumerate(images) if image is not None]
        side = self.pre.image_size
        if self.train:
            # float from the crop on, rounded once per batch: three kernels an image where
            # TF.resized_crop on uint8 takes six, and the values the CPU path's uint8 crop holds
            out = torch.empty(len(keep), 3, side, side, device=self.device)
            boxes = encoded.boxes.tolist()
            for n, i in enumerate(keep):
                top, left, height, width = boxes[i]
                crop = images[i][None, :, top:top + height, left:left + width].float()
                out[n] = nn_functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False,
                                                   antialias=True)[0]
            out.round_()
            flip = encoded.flips[keep].nonzero().flatten().tolist()
            if flip:
                index = torch.tensor(flip, device=self.device)
                out[index] = out[index].flip(-1)
        else:
            out = torch.empty(len(keep), 3, side, side, dtype=torch.uint8, device=self.device)
            for n, i in enumerate(keep):
                out[n] = TF.center_crop(TF.resize(images[i], [self.resize], antialias=True), [side])
        if len(keep) < len(images):
            y = y[keep]
        worker, emitted, skipped = book
        return normalize(out, self.pre), y.to(self.device, non_blocking=True), (worker, emitted, skipped + len(images) - len(keep))

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
