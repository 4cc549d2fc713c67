"""Calibration of HookMoE hooks: distillation from the same base at its original top-k."""

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.utils import logging

from .data import build_calibration_dataset
from .modeling_hookmoe import HookMoEForCausalLM


logger = logging.get_logger(__name__)

LOSS_NAMES = ("kl", "mse", "ce")


def parse_loss_weights(loss: str | dict[str, float]) -> dict[str, float]:
    """Turn `"kl"`, `"kl+mse"` or `{"kl": 1.0, "mse": 0.5}` into a weight per loss term.

    Terms: `kl` (KL divergence from the full-k logits to the reduced-k logits), `mse` (mean squared error between
    the hooked layers' outputs at reduced and full k) and `ce` (next-token cross-entropy on the labels).
    """
    weights = {name.strip(): 1.0 for name in loss.split("+")} if isinstance(loss, str) else dict(loss)
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown loss terms {unknown} in loss={loss!r}: use {', '.join(LOSS_NAMES)}, joined with '+' or "
            "given as a dict of weights."
        )
    negative = {name: weight for name, weight in weights.items() if weight < 0}
    if negative or not any(weight > 0 for weight in weights.values()):
        raise ValueError(f"Loss weights must be non-negative with at least one positive, got {weights}.")
    return {name: weight for name, weight in weights.items() if weight > 0}


class HookMoETrainer(Trainer):
    r"""
    [`~transformers.Trainer`] that trains the hooks of a [`HookMoEForCausalLM`] with its base frozen.

    The teacher is the same model run as the unmodified base (original top-k everywhere, hooks bypassed) under
    `torch.no_grad()`, so no second copy of the weights is loaded. Each step therefore runs one teacher forward
    and one student forward and backward.

    Args:
        loss (`str` or `dict[str, float]`, defaults to `"kl"`):
            Loss terms and their weights, see [`parse_loss_weights`]. `kl` and `mse` need the teacher pass; `ce`
            alone does not.
        temperature (`float`, defaults to 1.0):
            Softmax temperature of the KL term. The term is multiplied by `temperature**2` so that its gradient
            scale does not depend on the temperature.
        All other arguments are those of `Trainer`. `train_dataset` rows need `input_ids`; `labels` (with -100 on
        ignored positions) and `attention_mask` are optional. [`build_calibration_dataset`] builds such rows.

    Loss terms are sums over the counted positions divided by the Trainer's `num_items_in_batch` (the counted
    positions over all gradient-accumulation micro-batches), so they are not divided again by the accumulation
    steps. The mean of each term since the last log is logged as `kl_loss`, `mse_loss` and `ce_loss`.
    """

    def __init__(self, model: HookMoEForCausalLM | None = None, args=None, *, loss="kl", temperature=1.0, **kwargs):
        if not isinstance(model, HookMoEForCausalLM):
            raise TypeError(f"HookMoETrainer trains a HookMoEForCausalLM, got {type(model).__name__}.")
        if not model.config.hook_layers:
            raise ValueError("The model has no hooks to train (hook_layers is empty). Build it with hook_layers=[...].")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.loss_weights = parse_loss_weights(loss)
        self.temperature = temperature
        # Sums of each loss term since the last log, and the optimizer step of that log.
        self._loss_sums: dict[str, float] = {}
        self._loss_log_step = 0
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            # The hooks are bound to this model object, which the replicas of nn.DataParallel would share.
            raise ValueError(
                f"HookMoETrainer does not support nn.DataParallel (n_gpu={self.args.n_gpu}). Launch one process per "
                "GPU with torchrun, or make one GPU visible with CUDA_VISIBLE_DEVICES."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hookmoe: HookMoEForCausalLM = self.accelerator.unwrap_model(model)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)

        # Logits at position t predict token t+1, so position t counts when label t+1 is not ignored: the rule of
        # the causal-LM loss, and the count the Trainer uses for `num_items_in_batch`.
        counted = labels[:, 1:] != -100
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            normaliser = num_items_in_batch
        else:
            normaliser = counted.sum()
        normaliser = torch.as_tensor(normaliser, device=input_ids.device, dtype=torch.float32).clamp(min=1)

        mse_layers = hookmoe.config.hook_layers if "mse" in self.loss_weights else []
        teacher_logits = None
        teacher_hidden: dict[int, torch.Tensor] = {}
        if "kl" in self.loss_weights or "mse" in self.loss_weights:
            with torch.no_grad(), hookmoe.disable_hookmoe(), hookmoe.capture_layer_outputs(mse_layers) as captured:
                teacher_logits = hookmoe(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            teacher_hidden = dict(captured)

        student_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "ce" in self.loss_weights:
            student_kwargs["labels"] = labels
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                student_kwargs["num_items_in_batch"] = num_items_in_batch
        with hookmoe.capture_layer_outputs(mse_layers) as student_hidden:
            outputs = model(**student_kwargs)

        terms: dict[str, torch.Tensor] = {}
        if "kl" in self.loss_weights:
            terms["kl"] = self._kl_term(outputs.logits, teacher_logits, counted) / normaliser
        if "mse" in self.loss_weights:
            terms["mse"] = self._mse_term(student_hidden, teacher_hidden, counted) / normaliser
        if "ce" in self.loss_weights:
            terms["ce"] = outputs.loss
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())

        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # `num_items_in_batch` counts the positions of all processes, as in `Trainer.compute_loss`.
            loss = loss * self.accelerator.num_processes

        if model.training:
            # Record each term as it enters the logged loss: `training_step` divides by the accumulation steps
            # unless the terms were already normalised by `num_items_in_batch`.
            scaled_for_accumulation = num_items_in_batch is not None and self.model_accepts_loss_kwargs
            divisor = 1 if scaled_for_accumulation else self.current_gradient_accumulation_steps
            for name, value in terms.items():
                self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value.detach().item() / divisor
        return (loss, outputs) if return_outputs else loss

    def _kl_term(self, student_logits, teacher_logits, counted) -> torch.Tensor:
        """Sum over counted positions of KL(teacher || student) at the trainer's temperature."""
        student = student_logits[:, :-1][counted].float() / self.temperature
        teacher = teacher_logits[:, :-1][counted].float() / self.temperature
        kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="sum")
        return kl * self.temperature**2

    @staticmethod
    def _mse_term(student_hidden, teacher_hidden, counted) -> torch.Tensor:
        """Sum over counted positions of the squared error per hidden unit, averaged over the hooked layers."""
        total = 0.0
        for layer_idx, teacher in teacher_hidden.items():
            difference = student_hidden[layer_idx][:, :-1][counted].float() - teacher[:, :-1][counted].float()
            total = total + difference.pow(2).mean(dim=-1).sum()
        return total / max(len(teacher_hidden), 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        steps = self.state.global_step - self._loss_log_step
        if self._loss_sums and steps > 0 and "loss" in logs:
            for name, value in self._loss_sums.items():
                logs[f"{name}_loss"] = round(value / steps, 6)
            self._loss_sums = {}
            self._loss_log_step = self.state.global_step
        super().log(logs, start_time)


__all__ = ["HookMoETrainer", "build_calibration_dataset", "parse_loss_weights"]
