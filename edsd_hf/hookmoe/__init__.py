"""HookMoE: fewer active experts per token in an MoE model, with trainable hooks that win the quality back."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_hookmoe import HookMoEConfig, resolve_top_k_schedule
from .modeling_hookmoe import HookMoEForCausalLM, HookMoEHook
from .trainer import HookMoETrainer, build_calibration_dataset


# `exist_ok` keeps a second import (for example after importlib.reload) from raising.
AutoConfig.register(HookMoEConfig.model_type, HookMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(HookMoEConfig, HookMoEForCausalLM, exist_ok=True)

__all__ = [
    "HookMoEConfig",
    "HookMoEForCausalLM",
    "HookMoEHook",
    "HookMoETrainer",
    "build_calibration_dataset",
    "resolve_top_k_schedule",
]
