"""`EdsdTrainer`: trains an EDSD draft against a frozen target with the Hugging Face `Trainer`.

Alignment with inference, for a token sequence x_0..x_{L-1}:

- the frozen target runs once on x and returns the hidden states of the draft's `target_layer_ids`;
- draft position t (t = 0..L-2) reads the target features at t and the token x_{t+1}, and predicts x_{t+2};
- its target distribution is `softmax(target_logits[t + 1])` restricted to the draft vocabulary, and the
  target entropy of position t is the entropy of that distribution;
- position t counts for the loss when token x_{t+2} is a real token with loss mask on and the target's
  argmax at t+1 is inside the draft vocabulary ("valid"), and the curriculum has not dropped it.

The loss is the soft cross-entropy of each unrolled TTT step against the same targets, with step i
weighted by `ttt_step_weight ** i`. It is summed over positions and divided by the number of kept
positions of the whole optimizer step, which the Trainer passes as `num_items_in_batch`. That count
covers all gradient-accumulation micro-batches, and all processes when `average_tokens_across_devices`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .curriculum import EdsdCurriculumCallback, entropy_curriculum_mask
from .data import EdsdDataCollator
from .modeling_edsd import EdsdDraftModel


logger = logging.get_logger(__name__)

# Draft config fields a resumed checkpoint must share with the draft being trained.
DRAFT_FIELDS_CHECKED_ON_RESUME = (
    "fusion",
    "target_layer_ids",
    "draft_vocab_size",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "target_model_type",
)


@contextlib.contextmanager
def _forward_runs_unrolled(draft: EdsdDraftModel):
    """Make `draft(...)` run `draft.forward_unrolled` inside the block.

    A DistributedDataParallel wrapper synchronises gradients only for calls that go through its own
    `forward`, which calls `draft.forward`, so calling `forward_unrolled` on the unwrapped draft would
    train each process on its own gradients.
    """
    previous = draft.__dict__.get("forward")
    draft.forward = draft.forward_unrolled
    try:
        yield
    finally:
        if previous is None:
            del draft.forward
        else:
            draft.forward = previous


def soft_cross_entropy(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Return `-sum_v p(v) log q(v)` per position, for draft logits and target probabilities over the draft vocabulary."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    return -(target_probs.float() * log_q).sum(dim=-1)


def chain_acceptance_lengths(step_correct: list[torch.Tensor]) -> torch.Tensor:
    """Return, per anchor position, 1 plus the number of leading draft steps whose top-1 token is correct.

    `step_correct[k][b, t]` is True when the step-k prediction at position t is correct. The draft chain
    anchored at position a makes its k-th proposal at position a + k. The leading 1 counts the token the
    target always contributes, as the acceptance length of speculative decoding does.
    """
    alive = torch.ones_like(step_correct[0], dtype=torch.bool)
    accepted = torch.zeros_like(step_correct[0], dtype=torch.long)
    for step, correct in enumerate(step_correct):
        # Shift left by `step` so that column a contains the chain anchored at a.
        correct_at_anchor = F.pad(correct[:, step:], (0, step), value=False)
        alive = alive & correct_at_anchor
        accepted += alive.long()
    return 1 + accepted


def _data_signature(dataset) -> dict | None:
    """Size and a hash of the first token sequences of `dataset`, to recognise a checkpoint of another run."""
    if dataset is None or not hasattr(dataset, "__len__") or "input_ids" not in getattr(dataset, "column_names", []):
        return None
    digest = hashlib.sha256()
    for input_ids in dataset.select(range(min(len(dataset), 64)))["input_ids"]:
        digest.update(json.dumps(list(input_ids)).encode())
    return {"num_examples": len(dataset), "head_sha256": digest.hexdigest()[:16]}


class EdsdTrainer(Trainer):
    r"""
    [`Trainer`] for an [`EdsdDraftModel`]: the draft is the trained model and `target` stays frozen.

    For each batch the target runs once without gradient and gives the draft's input features, its
    distribution over the draft vocabulary and its per-position entropy. [`compute_loss`] unrolls the draft
    over the TTT depth of the curriculum and returns the weighted soft cross-entropy.

    Args:
        model ([`EdsdDraftModel`]): The draft to train. Its draft vocabulary (`d2t`) must already be set.
        target ([`PreTrainedModel`]): The frozen target. It is moved to the training device unless it was
            loaded with a device map.
        args ([`TrainingArguments`], *optional*): As for [`Trainer`].
        curriculum ([`EdsdCurriculumCallback`], `"edsd"` or `None`, defaults to `"edsd"`):
            The entropy curriculum. `"edsd"` uses the published epoch-based schedules, `None` the EAGLE-3-style
            baseline (no position dropped, fixed depth `baseline_ttt_depth`) through the same code path.
        baseline_ttt_depth (`int`, defaults to 7): TTT depth of the baseline (`curriculum=None`).
        ttt_step_weight (`float`, defaults to 0.8): The loss of unrolled step i is weighted by this to the power i.
        eval_ttt_depth (`int`, *optional*): Unroll depth of evaluation, which is also the number of draft tokens
            per round assumed by the acceptance-length estimate. Defaults to the curriculum's deepest unroll.

    Logged with the training loss: `drop_ratio` and `ttt_depth` of the last logged step, and per TTT step
    `ttt_loss_{i}` (unweighted soft cross-entropy) and `ttt_acc_{i}` (top-1 agreement with the target).
    [`evaluate`] returns `eval_loss`, the per-step values and `eval_acceptance_length`.
    """

    def __init__(
        self,
        model: EdsdDraftModel,
        target: PreTrainedModel,
        args=None,
        curriculum: EdsdCurriculumCallback | str | None = "edsd",
        baseline_ttt_depth: int = 7,
        ttt_step_weight: float = 0.8,
        eval_ttt_depth: int | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        **kwargs,
    ):
        if not isinstance(model, EdsdDraftModel):
            raise TypeError(f"EdsdTrainer trains an EdsdDraftModel, got {type(model).__name__}.")
        if not 0.0 < ttt_step_weight <= 1.0:
            raise ValueError(f"ttt_step_weight must lie in (0, 1], got {ttt_step_weight}.")
        # Raises a ValueError naming the mismatch when the draft does not fit the target.
        model.attach_target(target)
        config = model.config
        identity_vocab = torch.equal(model.d2t.cpu(), torch.arange(config.draft_vocab_size))
        if config.draft_vocab_size < config.vocab_size and identity_vocab:
            logger.warning(
                "The draft vocabulary is still the first %d target ids. Set the most frequent training tokens with "
                "`draft.set_draft_vocab(build_draft_vocab(train_dataset, %d, %d))` before training.",
                config.draft_vocab_size,
                config.vocab_size,
                config.draft_vocab_size,
            )
        target.requires_grad_(False)
        target.eval()

        curriculum_callback = self._resolve_curriculum(curriculum, baseline_ttt_depth)
        if data_collator is None:
            pad_token_id = target.config.get_text_config().pad_token_id
            data_collator = EdsdDataCollator(pad_token_id=pad_token_id if pad_token_id is not None else 0)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), curriculum_callback],
            **kwargs,
        )
        if getattr(target, "hf_device_map", None) is None:
            target.to(self.args.device)
        self.target = target
        self.ttt_step_weight = ttt_step_weight
        self.eval_ttt_depth = eval_ttt_depth or curriculum_callback.max_depth
        # Naming `loss_mask` as the label column makes `remove_unused_columns=True` keep it, although the
        # draft's forward does not take it. `input_ids` and `attention_mask` are forward arguments.
        self.label_names = ["loss_mask"]
        # `compute_loss` divides by `num_items_in_batch`, the count over the whole accumulated batch.
        self.loss_is_scaled_for_ga = True
        self._train_metric_sums = None
        # (drop ratio, TTT depth) of the optimizer step being trained, set when its batches are fetched.
        self._step_schedule = (curriculum_callback.drop_ratio, curriculum_callback.ttt_depth)
        curriculum_callback.run_signature = self.run_signature()

    @staticmethod
    def _resolve_curriculum(curriculum, baseline_ttt_depth: int) -> EdsdCurriculumCallback:
        if curriculum is None:
            return EdsdCurriculumCallback.baseline(ttt_depth=baseline_ttt_depth)
        if curriculum == "edsd":
            return EdsdCurriculumCallback()
        if isinstance(curriculum, EdsdCurriculumCallback):
            return curriculum
        raise ValueError(f"Invalid curriculum {curriculum!r}: pass an EdsdCurriculumCallback, 'edsd' or None.")

    @property
    def curriculum(self) -> EdsdCurriculumCallback:
        """The curriculum callback in use (restoring callback states from a checkpoint replaces the instance)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EdsdCurriculumCallback):
                return callback
        raise RuntimeError("The EdsdCurriculumCallback was removed from the trainer's callbacks.")

    @property
    def draft(self) -> EdsdDraftModel:
        return self.accelerator.unwrap_model(self.model)

    # ----- target pass ---------------------------------------------------------------------------

    @torch.no_grad()
    def compute_target_batch(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the frozen target on a batch; return the draft's features, targets and position masks.

        All returned tensors cover the draft positions t = 0..L-2 (see the module docstring).
        """
        draft = self.draft
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if input_ids.shape[1] < 3:
            raise ValueError(f"Training sequences need at least 3 tokens, got a batch of length {input_ids.shape[1]}.")
        target_device = self.target.get_input_embeddings().weight.device

        # The list form of `output_hidden_states` is the selection generation uses. It matters because
        # transformers returns the last layer after the final norm.
        layer_ids = draft.config.target_layer_ids
        outputs = self.target(
            input_ids=input_ids.to(target_device),
            attention_mask=attention_mask.to(target_device),
            output_hidden_states=[i + 1 for i in layer_ids],
        )
        features = torch.cat([outputs.hidden_states[i + 1][:, :-1] for i in layer_ids], dim=-1)
        logits = outputs.logits[:, 1:].to(input_ids.device)
        target_argmax = logits.argmax(dim=-1)
        target_probs = F.softmax(logits[..., draft.d2t].float(), dim=-1)
        del outputs, logits

        # Draft position t trains on token t+2: shift the token masks by two and close the last position.
        token_mask = (inputs["loss_mask"].bool() & attention_mask.bool())[:, 2:]
        position_mask = F.pad(token_mask, (0, 1), value=False)
        valid_mask = position_mask & draft.t2d[target_argmax]
        return {
            "target_hidden_states": features.to(input_ids.device),
            "target_probs": target_probs,
            "target_argmax": target_argmax,
            "position_mask": position_mask,
            "valid_mask": valid_mask,
        }

    def prepare_batch(self, inputs: dict[str, torch.Tensor], drop_ratio: float) -> dict[str, torch.Tensor]:
        """Add the target outputs and the curriculum's kept-position mask (`kept_mask`) to a batch."""
        batch = {**inputs, **self.compute_target_batch(inputs)}
        target_probs = batch["target_probs"]
        entropy = -(target_probs * torch.log(target_probs.clamp_min(1e-30))).sum(dim=-1)
        batch["kept_mask"] = entropy_curriculum_mask(entropy, batch["valid_mask"], drop_ratio)
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step, run the target on each and count the kept positions.

        The count is `num_items_in_batch`: the loss of every micro-batch is divided by it, so gradient
        accumulation and several processes give the gradient of one large batch.

        NOTE: the target outputs of all `gradient_accumulation_steps` micro-batches are held at once,
        including float32 probabilities of shape `[batch, length, draft_vocab_size]` per micro-batch.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Fixed for the whole optimizer step; the callback moves to the next step's values before logging.
        self._step_schedule = (self.curriculum.drop_ratio, self.curriculum.ttt_depth)
        drop_ratio = self._step_schedule[0]
        batch_samples = [self.prepare_batch(self._prepare_inputs(batch), drop_ratio) for batch in batch_samples]
        if not batch_samples:
            return batch_samples, None

        num_items_in_batch = sum(batch["kept_mask"].sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items_in_batch = self.accelerator.gather(num_items_in_batch).sum()
        return batch_samples, num_items_in_batch

    # ----- loss ----------------------------------------------------------------------------------

    def _draft_step_logits(self, model, inputs: dict[str, torch.Tensor], num_steps: int) -> list[torch.Tensor]:
        draft = self.draft
        unrolled_inputs = {
            "target_hidden_states": inputs["target_hidden_states"],
            "input_ids": inputs["input_ids"][:, 1:],
            "attention_mask": inputs["attention_mask"][:, 1:],
            "num_steps": num_steps,
        }
        if model is draft:
            return draft.forward_unrolled(**unrolled_inputs)
        with _forward_runs_unrolled(draft), self.accelerator.autocast():
            return model(**unrolled_inputs)

    def unrolled_loss(
        self, step_logits: list[torch.Tensor], inputs: dict[str, torch.Tensor], loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the weighted sum of soft cross-entropies over all steps and positions, and per-step statistics.

        Step i skips positions t < i, whose draft chain would start before the sequence. The statistics
        are a `[num_steps, 3]` tensor of (unweighted loss sum, correct top-1 count, position count).
        """
        positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)
        d2t = self.draft.d2t
        loss_sum = torch.zeros((), device=loss_mask.device)
        statistics = []
        for step, logits in enumerate(step_logits):
            step_mask = loss_mask & (positions >= step)
            cross_entropy = soft_cross_entropy(logits, inputs["target_probs"])
            # `where` rather than a product, so that a non-finite value at a masked position stays out of the sum.
            step_loss = torch.where(step_mask, cross_entropy, 0.0).sum()
            loss_sum = loss_sum + (self.ttt_step_weight**step) * step_loss
            with torch.no_grad():
                correct = (d2t[logits.argmax(dim=-1)] == inputs["target_argmax"]) & step_mask
                statistics.append(torch.stack([step_loss.detach(), correct.sum().float(), step_mask.sum().float()]))
        return loss_sum, torch.stack(statistics)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return the curriculum-masked, TTT-unrolled soft cross-entropy of the draft against the target.

        The sum over kept positions is divided by `num_items_in_batch` (the kept positions of the whole
        optimizer step), or by this batch's kept positions when it is not given.
        """
        drop_ratio, num_steps = self._step_schedule if model.training else (0.0, self.eval_ttt_depth)
        if "kept_mask" not in inputs:
            inputs = self.prepare_batch(inputs, drop_ratio)
        step_logits = self._draft_step_logits(model, inputs, num_steps)
        loss_sum, statistics = self.unrolled_loss(step_logits, inputs, inputs["kept_mask"])

        if num_items_in_batch is None:
            loss = loss_sum / inputs["kept_mask"].sum().clamp_min(1)
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp_min(1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over processes, but the count already sums over all of them.
                loss = loss * self.accelerator.num_processes

        if model.training:
            self._accumulate_train_metrics(statistics)
        return (loss, step_logits) if return_outputs else loss

    # ----- logging -------------------------------------------------------------------------------

    def _accumulate_train_metrics(self, statistics: torch.Tensor) -> None:
        # Rows up to the deepest unroll, so that processes reduce tensors of one shape.
        padded = F.pad(statistics, (0, 0, 0, self.curriculum.max_depth - statistics.shape[0]))
        self._train_metric_sums = padded if self._train_metric_sums is None else self._train_metric_sums + padded

    @staticmethod
    def _step_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
        metrics = {}
        for step, (loss_sum, correct, count) in enumerate(sums.tolist()):
            if count > 0:
                metrics[f"{prefix}ttt_loss_{step}"] = loss_sum / count
                metrics[f"{prefix}ttt_acc_{step}"] = correct / count
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the curriculum state and the per-TTT-step loss and accuracy to the training logs."""
        if "loss" in logs:
            logs["drop_ratio"], logs["ttt_depth"] = self._step_schedule
            if self._train_metric_sums is not None:
                sums = self._train_metric_sums
                if self.args.world_size > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                logs.update(self._step_metrics(sums))
                self._train_metric_sums = None
        super().log(logs, start_time)

    # ----- evaluation ----------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate on every valid position (no curriculum drop) at depth `eval_ttt_depth`.

        Returns `{prefix}_loss`, per-step `{prefix}_ttt_loss_{i}` and `{prefix}_ttt_acc_{i}`, and
        `{prefix}_acceptance_length`: the mean, over held-out positions, of 1 plus the number of leading
        draft tokens whose top-1 equals the target's top-1 in a chain of `eval_ttt_depth` draft tokens.
        This is an estimate: the chain reads the data's tokens instead of its own proposals, and a chain
        starts at every position, while `generate()` starts one only after each verification. Data the
        target generated itself (see `regenerate_*` in `edsd_hf.edsd.data`) keeps the two closest.
        """
        dataloader = self.get_eval_dataloader(eval_dataset)
        draft = self.draft
        was_training = draft.training
        draft.eval()
        depth = self.eval_ttt_depth
        device = self.args.device
        loss_totals = torch.zeros(2, device=device)  # weighted loss sum, kept positions
        step_sums = torch.zeros(depth, 3, device=device)
        acceptance_totals = torch.zeros(2, device=device)  # sum of lengths, anchors

        progress = tqdm(
            dataloader, desc="Evaluating draft", disable=self.args.disable_tqdm or not self.is_local_process_zero()
        )
        with torch.no_grad():
            for batch in progress:
                batch = self.prepare_batch(self._prepare_inputs(batch), drop_ratio=0.0)
                step_logits = draft.forward_unrolled(
                    batch["target_hidden_states"],
                    input_ids=batch["input_ids"][:, 1:],
                    attention_mask=batch["attention_mask"][:, 1:],
                    num_steps=depth,
                )
                loss_sum, statistics = self.unrolled_loss(step_logits, batch, batch["kept_mask"])
                loss_totals += torch.stack([loss_sum, batch["kept_mask"].sum().float()])
                step_sums += statistics

                position_mask = batch["position_mask"]
                step_correct = [
                    (draft.d2t[logits.argmax(dim=-1)] == batch["target_argmax"]) & position_mask
                    for logits in step_logits
                ]
                lengths = chain_acceptance_lengths(step_correct)
                acceptance_totals += torch.stack([(lengths * position_mask).sum().float(), position_mask.sum().float()])
        if was_training:
            draft.train()

        # NOTE: with several processes, accelerate pads the last evaluation batch with repeated samples
        # (`even_batches`), so a few held-out sequences may count twice in these sums.
        if self.args.world_size > 1:
            loss_totals, step_sums, acceptance_totals = (
                self.accelerator.reduce(tensor, reduction="sum") for tensor in (loss_totals, step_sums, acceptance_totals)
            )
        metrics = {"loss": (loss_totals[0] / loss_totals[1].clamp_min(1)).item()}
        metrics.update(self._step_metrics(step_sums))
        metrics["acceptance_length"] = (acceptance_totals[0] / acceptance_totals[1].clamp_min(1)).item()
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}

        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ----- checkpoints ---------------------------------------------------------------------------

    def run_signature(self) -> dict:
        """Facts that a checkpoint must share with this run to be resumed by it."""
        target_config = self.target.config.get_text_config()
        return {
            "target": getattr(self.target, "name_or_path", "") or "",
            "target_model_type": target_config.model_type,
            "target_num_hidden_layers": target_config.num_hidden_layers,
            "ttt_step_weight": self.ttt_step_weight,
            "train_data": _data_signature(self.train_dataset),
        }

    def check_resume_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Raise a ValueError naming `checkpoint` and the differing value if it was written by another run."""
        checkpoint = Path(checkpoint)
        state_file = checkpoint / "trainer_state.json"
        config_file = checkpoint / "config.json"
        if not state_file.is_file() or not config_file.is_file():
            raise ValueError(
                f"Cannot resume from {str(checkpoint)!r}: it is not a Trainer checkpoint (trainer_state.json or "
                "config.json is missing)."
            )

        saved_config = json.loads(config_file.read_text())
        for field in DRAFT_FIELDS_CHECKED_ON_RESUME:
            current = getattr(self.draft.config, field)
            if saved_config.get(field) != current:
                raise ValueError(
                    f"Cannot resume from {str(checkpoint)!r}: it contains a draft with {field}={saved_config.get(field)!r}, "
                    f"this run trains {field}={current!r}. Resume from a checkpoint of this run, or start a new run."
                )

        stateful_callbacks = json.loads(state_file.read_text()).get("stateful_callbacks", {})
        saved = stateful_callbacks.get(type(self.curriculum).__name__)
        if saved is None:
            raise ValueError(
                f"Cannot resume from {str(checkpoint)!r}: it was not written by an EdsdTrainer (no curriculum state)."
            )
        saved = saved[0] if isinstance(saved, list) else saved
        expected = {"args": self.curriculum.settings(), "run_signature": self.curriculum.run_signature}
        found = {"args": saved.get("args", {}), "run_signature": saved.get("attributes", {}).get("run_signature")}
        for group in ("args", "run_signature"):
            for name, value in (expected[group] or {}).items():
                if (found[group] or {}).get(name) != value:
                    raise ValueError(
                        f"Cannot resume from {str(checkpoint)!r}: it was written by another run ({name}="
                        f"{(found[group] or {}).get(name)!r} there, {value!r} here). Resume from a checkpoint of this "
                        "run, or start a new run."
                    )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As [`Trainer.train`], after checking that a checkpoint to resume belongs to this run."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint to resume found in output_dir {self.args.output_dir!r}.")
        if resume_from_checkpoint:
            self.check_resume_checkpoint(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )


__all__ = ["EdsdTrainer", "chain_acceptance_lengths", "soft_cross_entropy"]
