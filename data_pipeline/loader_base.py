"""The contract every loader follows: epochs, length, exact resume, skip statistics."""
from __future__ import annotations

import abc
from typing import Any, Iterator

import torch

from .bad_data import BadSample, BadSampleError, SkipReport, from_worker, log

Batch = tuple[torch.Tensor, torch.Tensor]


def to_model_input(images_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → contiguous float32 ``[B, 3, H, W]`` in [-1, 1], on its device."""
    b, h, w, c = images_nhwc.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32, device=images_nhwc.device)
    # The transposing widen first, then two in-place passes over contiguous floats: on a CPU
    # this is 2.4x faster than one mixed-dtype, strided multiply into ``out`` (same bits).
    # (x / 255 - 0.5) / 0.5 == x / 127.5 - 1.
    out.copy_(images_nhwc.permute(0, 3, 1, 2))
    return out.mul_(1 / 127.5).sub_(1.0)


def planar_to_model_input(images_nchw: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float32 ``[B, 3, H, W]`` in [-1, 1], on its device (same values
    as :func:`to_model_input` of the HWC layout)."""
    out = torch.empty(images_nchw.shape, dtype=torch.float32, device=images_nchw.device)
    out.copy_(images_nchw)
    return out.mul_(1 / 127.5).sub_(1.0)


class LoaderSettingsMismatch(ValueError):
    """A saved loader position was taken under other data settings (batch size, shards, ...).

    ``differences`` maps each setting to ``(saved, now)``; ``detail`` says it in words.
    """

    def __init__(self, differences: dict[str, tuple[Any, Any]]):
        self.differences = differences
        self.detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())
        super().__init__(f"cannot resume the data position: loader settings differ ({self.detail}); "
                         "resume with the same data settings, pass strict=False to continue the "
                         "epoch in a new order, or call set_epoch() to start the epoch over")


class Loader(abc.ABC):
    """One rank's view of a dataset: iterate for one epoch of ``(images, labels)`` batches.

    ``len(loader)`` batches per epoch, equal on every rank. ``state_dict()`` records the epoch
    and the batches handed out so far; after ``load_state_dict()`` the next iteration of that
    epoch continues with exactly the batches the interrupted run would have seen next.
    """

    kind = "base"
    equal_batches = True
    """Every batch of every rank holds ``batch_size`` samples (an exact epoch pads its last
    batch with repeats, see ``last_batch_padding``): the training step exchanges no batch
    sizes.  A loader whose last batch is shorter sets this False, or yields
    ``(images, labels, sizes)`` with every rank's size for that batch."""

    def __init__(self, *, num_classes: int, num_batches: int, rank: int, world_size: int,
                 batch_size: int, seed: int, mode: str, settings: dict[str, Any]) -> None:
        self.num_classes = num_classes
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.mode = seed, mode
        self.epoch = 0
        self._num_batches = num_batches
        self._consumed = 0
        self._resume_at: int | None = None
        # What must match for a saved position to mean the same batches.
        # The rank is not among them: every rank is at the same position, so one rank's
        # state may restore all of them.
        self._settings = {"kind": self.kind, "mode": mode, "seed": seed,
                          "world_size": world_size, "batch_size": batch_size, **settings}
        self._report = SkipReport()

    # -- contract ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (it seeds shuffling and augmentation)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self._resume_at = None
            self._consumed = 0
        self.epoch = epoch

    max_bad_fraction: float | None = None
    """Stop (BadDataLimitError) when more than this fraction of the samples read were bad; None: no limit
    (the trainer sets data.max_bad_fraction)."""
    read_ahead = 0
    """Samples read before any is handed out (shuffle buffers): counted as read by the bad-fraction limit."""
    counts_handed_out = True
    """The samples handed out are the samples read; False for a loader that reads the whole
    dataset up front (DALI's indexing) and sets ``_report.handed_out`` itself."""

    def __iter__(self) -> Iterator[Batch]:
        start = self._resume_at or 0
        self._resume_at = None
        self._consumed = start
        try:
            for images, labels in self._iter_epoch(self.epoch, start):
                self._consumed += 1
                if self.counts_handed_out:
                    self._report.handed_out += len(labels)
                self._report.check_limit(self.max_bad_fraction, self.read_ahead)
                yield images, labels
        except BadSampleError as err:
            unwrapped = from_worker(err)
            if unwrapped is err:
                raise
            raise unwrapped from None

    @property
    def stats(self) -> dict[str, int]:
        """Bad samples skipped so far, by reason."""
        return self._report.as_dict()

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this epoch's last batch that repeat earlier ones (exact mode)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches consumed in it, skip counts and the settings they depend on."""
        return {"epoch": self.epoch, "batches_consumed": self._consumed,
                "stats": self._report.as_dict(), "bad_seen": self._report.seen(), "settings": dict(self._settings)}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from ``state``: the next iteration yields that epoch's remaining batches.

        With other settings than the saved ones the same batches cannot be replayed:
        ``strict`` raises; otherwise the epoch continues after as many samples as were
        consumed (a warning says so), in this loader's own order.
        """
        saved = state.get("settings", {})
        differ = {k: (saved.get(k), v) for k, v in self._settings.items() if saved.get(k) != v}
        consumed = int(state["batches_consumed"])
        if differ:
            mismatch = LoaderSettingsMismatch(differ)
            if strict:
                raise mismatch
            detail = mismatch.detail
            samples = consumed * int(saved.get("batch_size") or self.batch_size) * \
                int(saved.get("world_size") or self.world_size)
            consumed = min(samples // (self.batch_size * self.world_size), self._num_batches)
            log.warning("loader settings differ from the checkpoint's (%s): epoch %s continues "
                        "at batch %d of %d in a new order", detail, state["epoch"], consumed,
                        self._num_batches)
        if not 0 <= consumed <= self._num_batches:
            raise ValueError(f"batches_consumed={consumed} is outside [0, {self._num_batches}]: "
                             "the checkpoint's epoch is longer than this loader's")
        self.epoch = int(state["epoch"])
        self._consumed = consumed
        self._resume_at = consumed
        self._report.load(state.get("stats", {}), state.get("bad_seen", ()))

    # -- for subclasses ------------------------------------------------------------------------
    def _record(self, events: list[BadSample]) -> None:
        self._report.add(events)

    @abc.abstractmethod
    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        """Batches ``start, start+1, ..., len-1`` of ``epoch``."""
