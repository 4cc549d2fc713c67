"""Entropy curriculum: the position mask and the drop-ratio and TTT-depth schedules."""

import math

import pytest
import torch
from transformers import TrainerState

from edsd_hf.edsd.curriculum import EdsdCurriculumCallback, drop_ratio_at, entropy_curriculum_mask, ttt_depth_at


def make_state(epoch=0.0, global_step=0, max_steps=100, num_train_epochs=5):
    state = TrainerState()
    state.epoch = epoch
    state.global_step = global_step
    state.max_steps = max_steps
    state.num_train_epochs = num_train_epochs
    return state


# ----- mask -------------------------------------------------------------------------------------


def test_mask_drops_highest_entropy_valid_positions():
    entropy = torch.tensor(
        [
            [0.1, 2.0, 0.5, 3.0, 0.2],
            [1.5, 9.0, 0.3, 2.5, 0.4],
        ]
    )
    valid = torch.tensor(
        [
            [1, 1, 1, 1, 0],
            [1, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    # 8 valid positions, drop ratio 0.3 -> floor(2.4) = 2 dropped. Ranked across both rows, the two
    # highest valid entropies are 3.0 (row 0, col 3) and 2.5 (row 1, col 3). 9.0 is not valid.
    kept = entropy_curriculum_mask(entropy, valid, drop_ratio=0.3)
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(kept, expected)


def test_mask_counts_floor_of_ratio_times_valid():
    entropy = torch.arange(100, dtype=torch.float).view(4, 25)
    valid = torch.ones(4, 25, dtype=torch.bool)
    valid[0, :10] = False  # 90 valid positions
    for drop_ratio in (0.0, 0.02, 0.1, 0.29, 0.4):
        kept = entropy_curriculum_mask(entropy, valid, drop_ratio)
        num_dropped = int(valid.sum() - kept.sum())
        assert num_dropped == math.floor(drop_ratio * 90 + 1e-6), drop_ratio
        # The dropped positions are exactly the highest-entropy ones.
        dropped_entropies = entropy[valid & ~kept]
        kept_entropies = entropy[kept]
        if num_dropped:
            assert dropped_entropies.min() > kept_entropies.max()


def test_mask_never_adds_positions():
    entropy = torch.rand(3, 7)
    valid = torch.rand(3, 7) > 0.5
    kept = entropy_curriculum_mask(entropy, valid, 0.4)
    assert not (kept & ~valid).any()


def test_mask_rejects_invalid_ratio():
    with pytest.raises(ValueError, match="drop_ratio"):
        entropy_curriculum_mask(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 1.0)


# ----- schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_epochs", [2, 3, 5, 10, 30])
def test_epoch_schedules_match_published_formulas(num_epochs):
    callback = EdsdCurriculumCallback()
    for epoch in range(num_epochs):
        # Anywhere inside the epoch, the schedule is that of the epoch index.
        for fraction in (0.0, 0.5, 0.99):
            state = make_state(epoch=epoch + fraction, num_train_epochs=num_epochs)
            drop_ratio, depth = callback.schedule_at(state)
            assert drop_ratio == pytest.approx(min(max((num_epochs - epoch) * 0.02, 0.0), 0.4))
            assert depth == math.ceil(1 + (7 - 1) * epoch / (num_epochs - 1))


def test_epoch_schedule_drops_in_last_epoch_by_default():
    callback = EdsdCurriculumCallback()
    drop_ratio, depth = callback.schedule_at(make_state(epoch=4.2, num_train_epochs=5))
    assert drop_ratio == pytest.approx(0.02)
    assert depth == 7


def test_full_final_phase_trains_every_token():
    callback = EdsdCurriculumCallback(full_final_phase=True)
    final_ratio, _ = callback.schedule_at(make_state(epoch=4.2, num_train_epochs=5))
    earlier_ratio, _ = callback.schedule_at(make_state(epoch=3.9, num_train_epochs=5))
    assert final_ratio == 0.0
    assert earlier_ratio == pytest.approx(0.04)


def test_drop_ratio_is_capped():
    callback = EdsdCurriculumCallback(max_drop_ratio=0.3)
    drop_ratio, _ = callback.schedule_at(make_state(epoch=0, num_train_epochs=40))
    assert drop_ratio == pytest.approx(0.3)
    assert drop_ratio_at(0, 40) == pytest.approx(0.4)


def test_explicit_depth_list_per_epoch():
    callback = EdsdCurriculumCallback(ttt_depth_per_epoch=[1, 3, 5])
    depths = [callback.schedule_at(make_state(epoch=epoch, num_train_epochs=5))[1] for epoch in range(5)]
    assert depths == [1, 3, 5, 5, 5]
    assert callback.max_depth == 5


def test_step_pacing_follows_progress():
    callback = EdsdCurriculumCallback(pacing="step", num_phases=5)
    for global_step in (0, 10, 25, 50, 79, 80, 99):
        phase = 5 * global_step / 100
        drop_ratio, depth = callback.schedule_at(make_state(global_step=global_step, max_steps=100))
        assert drop_ratio == pytest.approx(min(max((5 - phase) * 0.02, 0.0), 0.4))
        assert depth == min(math.ceil(1 + 6 * phase / 4 - 1e-6), 7)


def test_step_pacing_default_starts_at_cap_and_decays():
    callback = EdsdCurriculumCallback(pacing="step", full_final_phase=True)
    start, start_depth = callback.schedule_at(make_state(global_step=0, max_steps=200))
    middle, _ = callback.schedule_at(make_state(global_step=100, max_steps=200))
    end, end_depth = callback.schedule_at(make_state(global_step=199, max_steps=200))
    assert start == pytest.approx(0.4)
    assert middle == pytest.approx(0.2)
    assert end == 0.0
    assert start_depth == 1
    assert end_depth == 7


def test_depth_formula_reaches_max_at_last_phase():
    assert ttt_depth_at(0, 4) == 1
    assert ttt_depth_at(3, 4) == 7
    assert ttt_depth_at(0, 1) == 7


def test_baseline_is_constant():
    callback = EdsdCurriculumCallback.baseline(ttt_depth=5)
    for epoch in (0.0, 2.5, 4.9):
        assert callback.schedule_at(make_state(epoch=epoch)) == (0.0, 5)


# ----- callback ---------------------------------------------------------------------------------


def test_callback_updates_on_events():
    callback = EdsdCurriculumCallback()
    state = make_state(epoch=0.0, num_train_epochs=3)
    callback.on_train_begin(None, state, None)
    assert (callback.drop_ratio, callback.ttt_depth) == (pytest.approx(0.06), 1)
    state.epoch = 1.0
    state.global_step = 10
    callback.on_step_end(None, state, None)
    assert (callback.drop_ratio, callback.ttt_depth) == (pytest.approx(0.04), 4)


def test_callback_state_round_trip():
    callback = EdsdCurriculumCallback(pacing="step", drop_step=0.05, ttt_depth_per_epoch=[2, 4], full_final_phase=True)
    callback.run_signature = {"target": "tiny"}
    callback.on_train_begin(None, make_state(global_step=30, max_steps=100), None)
    restored = EdsdCurriculumCallback.from_state(callback.state())
    assert restored.settings() == callback.settings()
    assert restored.drop_ratio == callback.drop_ratio
    assert restored.ttt_depth == callback.ttt_depth
    assert restored.run_signature == {"target": "tiny"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pacing": "weekly"}, "pacing"),
        ({"max_drop_ratio": 1.5}, "max_drop_ratio"),
        ({"max_ttt_depth": 0}, "max_ttt_depth"),
        ({"ttt_depth_per_epoch": [2, 0]}, "ttt_depth_per_epoch"),
        ({"drop_step": -0.1}, "drop_step"),
    ],
)
def test_callback_rejects_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EdsdCurriculumCallback(**kwargs)
