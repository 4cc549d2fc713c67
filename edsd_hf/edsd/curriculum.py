"""Entropy curriculum of EDSD training: which positions count for the loss, and how deep to unroll.

Two schedules move together from easy to hard:

- drop ratio: the fraction of valid positions with the highest target entropy whose loss is masked,
  `drop_ratio(e) = min(max((E - e) * s, 0), cap)` for epoch `e` of `E` (s = 0.02, cap = 0.4);
- training-time-test (TTT) depth: the number of unrolled draft steps,
  `n(e) = ceil(1 + (S_max - 1) * e / (E - 1))` with S_max = 7, or an explicit per-epoch list.

Both are written here as functions of a phase in [0, E): the epoch index for the published
epoch-based pacing, `E * global_step / max_steps` for step-based pacing.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging


logger = logging.get_logger(__name__)

PACING_TYPES = ("epoch", "step", "constant")

# Slack for floating-point products such as 0.29 * 100 = 28.999999999999996 before flooring.
_FLOOR_EPSILON = 1e-6


def drop_ratio_at(phase: float, num_phases: int, drop_step: float = 0.02, max_drop_ratio: float = 0.4) -> float:
    """Return `min(max((E - phase) * s, 0), cap)`, the drop ratio at `phase` of `E = num_phases` phases.

    `phase` is the 0-based epoch index for epoch pacing and `E * global_step / max_steps` for step pacing.
    """
    return min(max((num_phases - phase) * drop_step, 0.0), max_drop_ratio)


def ttt_depth_at(phase: float, num_phases: int, max_ttt_depth: int = 7) -> int:
    """Return `ceil(1 + (S_max - 1) * phase / (E - 1))`, the TTT depth at `phase` of `E = num_phases` phases.

    The depth grows from 1 in the first phase to S_max in the last, and never exceeds S_max. A
    single-phase run has no room to grow and trains at S_max throughout.
    """
    if num_phases <= 1:
        return max_ttt_depth
    depth = math.ceil(1 + (max_ttt_depth - 1) * phase / (num_phases - 1) - _FLOOR_EPSILON)
    return int(min(max(depth, 1), max_ttt_depth))


def entropy_curriculum_mask(entropy: torch.Tensor, valid_mask: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """Mask the loss of the `drop_ratio` fraction of valid positions with the highest target entropy.

    Positions are ranked across the whole micro-batch (every row together). The number dropped is
    `floor(drop_ratio * number of valid positions)`. Dropped positions stay in the input as context;
    only their loss is masked, so the returned mask is a subset of `valid_mask`.

    Args:
        entropy (`torch.Tensor` of shape `(batch_size, sequence_length)`): Target entropy per position.
        valid_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`): Positions that count for the loss.
        drop_ratio (`float`): Fraction in [0, 1) of the valid positions to drop.

    Returns:
        `torch.BoolTensor` of the same shape: the positions whose loss is kept.
    """
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}.")
    valid_mask = valid_mask.bool()
    num_valid = int(valid_mask.sum())
    num_drop = math.floor(drop_ratio * num_valid + _FLOOR_EPSILON)
    if num_drop == 0:
        return valid_mask.clone()

    scores = entropy.float().masked_fill(~valid_mask, float("-inf")).flatten()
    dropped = torch.topk(scores, num_drop).indices
    kept = valid_mask.clone().flatten()
    kept[dropped] = False
    return kept.view_as(valid_mask)


class EdsdCurriculumCallback(TrainerCallback, ExportableState):
    r"""
    Entropy curriculum of EDSD as a [`TrainerCallback`]: sets the drop ratio and TTT depth that
    [`EdsdTrainer`] uses for each optimizer step.

    The values are recomputed from the [`TrainerState`] at the start of training, at each epoch and
    after each optimizer step, so a run resumed from a checkpoint continues the schedule where it
    stopped. The callback's settings are saved with each checkpoint (it implements `ExportableState`),
    and [`EdsdTrainer`] refuses to resume a checkpoint written with other settings.

    Args:
        pacing (`str`, defaults to `"epoch"`):
            `"epoch"`: the published schedules, constant within an epoch (`E` = the run's number of epochs).
            `"step"`: the same formulas on the continuous progress `global_step / max_steps`, for runs
            sized in steps. `"constant"`: `constant_drop_ratio` and `max_ttt_depth` throughout (the
            EAGLE-3-style baseline uses drop ratio 0).
        drop_step (`float`, defaults to 0.02): `s`, the drop ratio removed per phase.
        max_drop_ratio (`float`, defaults to 0.4): Cap of the drop ratio.
        max_ttt_depth (`int`, defaults to 7): `S_max`, the deepest unroll.
        ttt_depth_per_epoch (`list[int]`, *optional*):
            Explicit TTT depth of each epoch (epoch pacing) or phase (step pacing), used instead of the
            formula. Phases past the end of the list use its last entry.
        full_final_phase (`bool`, defaults to `False`):
            Train the final phase (the last epoch, or the last `1 / num_phases` of the steps) on every valid
            position. The published formula still drops `drop_step` there.
        num_phases (`int`, *optional*):
            `E` of the formulas. Epoch pacing defaults to the run's number of epochs. Step pacing defaults
            to `ceil(max_drop_ratio / drop_step)` (20 with the defaults), so the run starts at the cap.
        constant_drop_ratio (`float`, defaults to 0.0): Drop ratio of the `"constant"` pacing.
    """

    def __init__(
        self,
        pacing: str = "epoch",
        drop_step: float = 0.02,
        max_drop_ratio: float = 0.4,
        max_ttt_depth: int = 7,
        ttt_depth_per_epoch: list[int] | None = None,
        full_final_phase: bool = False,
        num_phases: int | None = None,
        constant_drop_ratio: float = 0.0,
    ):
        if pacing not in PACING_TYPES:
            raise ValueError(f"Invalid pacing {pacing!r}: expected one of {PACING_TYPES}.")
        if drop_step < 0:
            raise ValueError(f"drop_step must be non-negative, got {drop_step}.")
        if not 0.0 <= max_drop_ratio < 1.0:
            raise ValueError(f"max_drop_ratio must lie in [0, 1), got {max_drop_ratio}.")
        if not 0.0 <= constant_drop_ratio < 1.0:
            raise ValueError(f"constant_drop_ratio must lie in [0, 1), got {constant_drop_ratio}.")
        if max_ttt_depth < 1:
            raise ValueError(f"max_ttt_depth must be at least 1, got {max_ttt_depth}.")
        if ttt_depth_per_epoch is not None:
            ttt_depth_per_epoch = [int(depth) for depth in ttt_depth_per_epoch]
            if not ttt_depth_per_epoch or min(ttt_depth_per_epoch) < 1:
                raise ValueError(
                    f"ttt_depth_per_epoch must be a non-empty list of depths >= 1, got {ttt_depth_per_epoch}."
                )
        if num_phases is not None and num_phases < 1:
            raise ValueError(f"num_phases must be at least 1, got {num_phases}.")

        self.pacing = pacing
        self.drop_step = drop_step
        self.max_drop_ratio = max_drop_ratio
        self.max_ttt_depth = max_ttt_depth
        self.ttt_depth_per_epoch = ttt_depth_per_epoch
        self.full_final_phase = full_final_phase
        self.num_phases = num_phases
        self.constant_drop_ratio = constant_drop_ratio

        # Values for the next optimizer step, set from the TrainerState by the event handlers below.
        self.drop_ratio = constant_drop_ratio
        self.ttt_depth = max_ttt_depth
        # Facts about the run (target, data) that EdsdTrainer sets and checks when resuming a checkpoint.
        self.run_signature = None

    @classmethod
    def baseline(cls, ttt_depth: int = 7) -> "EdsdCurriculumCallback":
        """EAGLE-3-style baseline: every valid position counts and the unroll depth is fixed."""
        return cls(pacing="constant", max_ttt_depth=ttt_depth, constant_drop_ratio=0.0)

    @property
    def max_depth(self) -> int:
        """Deepest unroll any phase of this curriculum uses."""
        if self.pacing != "constant" and self.ttt_depth_per_epoch is not None:
            return max(self.ttt_depth_per_epoch)
        return self.max_ttt_depth

    # ----- schedule --------------------------------------------------------------------------

    def resolve_num_phases(self, state) -> int:
        """Return `E` for `state`: explicit, the run's number of epochs, or the step-pacing default."""
        if self.num_phases is not None:
            return self.num_phases
        if self.pacing != "step":
            return max(int(state.num_train_epochs or 1), 1)
        if self.drop_step == 0:
            return 1
        # Enough phases for the first one to start at the cap.
        return max(math.ceil(self.max_drop_ratio / self.drop_step - _FLOOR_EPSILON), 1)

    def ttt_depth_for_phase(self, phase: float, num_phases: int) -> int:
        if self.ttt_depth_per_epoch is not None:
            phase_index = math.floor(phase + _FLOOR_EPSILON)
            return self.ttt_depth_per_epoch[min(phase_index, len(self.ttt_depth_per_epoch) - 1)]
        return ttt_depth_at(phase, num_phases, self.max_ttt_depth)

    def schedule_at(self, state) -> tuple[float, int]:
        """Return `(drop_ratio, ttt_depth)` for the optimizer step that follows `state`."""
        if self.pacing == "constant":
            return self.constant_drop_ratio, self.max_ttt_depth

        num_phases = self.resolve_num_phases(state)
        if self.pacing == "epoch":
            # The schedule is constant within an epoch, so the phase is the index of the running epoch.
            phase = min(math.floor((state.epoch or 0.0) + _FLOOR_EPSILON), num_phases - 1)
        else:
            progress = state.global_step / state.max_steps if state.max_steps else 0.0
            phase = min(progress * num_phases, num_phases - _FLOOR_EPSILON)

        drop_ratio = drop_ratio_at(phase, num_phases, self.drop_step, self.max_drop_ratio)
        in_final_phase = phase >= num_phases - 1
        if self.full_final_phase and in_final_phase:
            drop_ratio = 0.0
        return drop_ratio, self.ttt_depth_for_phase(phase, num_phases)

    def _update(self, state) -> None:
        drop_ratio, ttt_depth = self.schedule_at(state)
        if (drop_ratio, ttt_depth) != (self.drop_ratio, self.ttt_depth):
            logger.info(
                "EDSD curriculum at step %d (epoch %.2f): drop ratio %.3f, TTT depth %d.",
                state.global_step,
                state.epoch or 0.0,
                drop_ratio,
                ttt_depth,
            )
        self.drop_ratio, self.ttt_depth = drop_ratio, ttt_depth

    # ----- TrainerCallback events --------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer fetches (and runs the target on) the next step's batches before `on_step_begin`,
        # so the next step's values are set here.
        self._update(state)

    # ----- ExportableState ---------------------------------------------------------------------

    def settings(self) -> dict:
        """Constructor arguments of this callback, as saved in checkpoints."""
        return {
            "pacing": self.pacing,
            "drop_step": self.drop_step,
            "max_drop_ratio": self.max_drop_ratio,
            "max_ttt_depth": self.max_ttt_depth,
            "ttt_depth_per_epoch": self.ttt_depth_per_epoch,
            "full_final_phase": self.full_final_phase,
            "num_phases": self.num_phases,
            "constant_drop_ratio": self.constant_drop_ratio,
        }

    def state(self) -> dict:
        attributes = {"drop_ratio": self.drop_ratio, "ttt_depth": self.ttt_depth, "run_signature": self.run_signature}
        return {"args": self.settings(), "attributes": attributes}


__all__ = ["EdsdCurriculumCallback", "drop_ratio_at", "entropy_curriculum_mask", "ttt_depth_at"]
