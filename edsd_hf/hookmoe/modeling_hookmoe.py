"""HookMoE: run an MoE causal LM with fewer experts per token and compensate with trainable hooks.

The base model keeps its modules. Its routers get a new `top_k`, which works per layer at run time because the
expert kernels of transformers 5.25 read k from the shape of the routing indices. Each hook is applied to the
input of its decoder layer through a forward pre-hook: decoder layers are called positionally in a loop over
`model.layers` and KV-cache slots are keyed by `self_attn.layer_idx`, so nothing is inserted into `layers`.
"""

import contextlib
import copy
import functools
import os
from collections.abc import Iterator

import safetensors.torch
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file, logging

from .configuration_hookmoe import HookMoEConfig


logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that locate files on the Hub. They apply to the HookMoE checkpoint, and all
# but `revision` and `subfolder` (which name a place in the HookMoE repository) also apply to the base.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token", "revision", "subfolder")
_BASE_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")
# Keyword arguments that the Auto classes add for their own bookkeeping.
_AUTO_CLASS_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "_commit_hash", "code_revision")

# Base config fields that must agree between the base a HookMoE checkpoint was saved for and the base it is
# loaded onto: they fix the hooks' shapes, the layer indices and the meaning of the schedule.
_BASE_FIELDS_TO_MATCH = ("model_type", "num_hidden_layers", "hidden_size", "num_experts", "num_experts_per_tok")


class HookMoEHook(nn.Module):
    """Residual low-rank MLP applied to a decoder layer's input: `x + up(act(down(norm(x))))`.

    `up` starts at zero, so an untrained hook returns `x` exactly. The hook computes in its own dtype (float32 by
    default) and adds its output to `x` in `x`'s dtype, which keeps training stable on a bfloat16 base.
    """

    def __init__(self, hidden_size: int, rank: int, activation: str, input_norm: bool, eps: float, std: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps) if input_norm else nn.Identity()
        self.down_proj = nn.Linear(hidden_size, rank, bias=False)
        self.act_fn = ACT2FN[activation]
        self.up_proj = nn.Linear(rank, hidden_size, bias=False)
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset to an untrained hook: normal down projection, zero up projection, unit norm weight."""
        with torch.no_grad():
            nn.init.normal_(self.down_proj.weight, mean=0.0, std=self.std)
            nn.init.zeros_(self.up_proj.weight)
            if isinstance(self.norm, nn.RMSNorm):
                nn.init.ones_(self.norm.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # With a `device_map`, accelerate moves a layer's inputs inside its forward, after this pre-hook has run.
        weight = self.down_proj.weight
        hook_input = hidden_states.to(device=weight.device, dtype=weight.dtype)
        delta = self.up_proj(self.act_fn(self.down_proj(self.norm(hook_input))))
        return hidden_states + delta.to(device=hidden_states.device, dtype=hidden_states.dtype)


def find_routers(base_model: PreTrainedModel) -> dict[int, nn.Module]:
    """Map decoder-layer index to the router (`layer.mlp.gate` with a `top_k` attribute) of each MoE layer."""
    routers = {}
    for i, layer in enumerate(decoder_layers(base_model)):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            routers[i] = gate
    return routers


def decoder_layers(base_model: PreTrainedModel) -> nn.ModuleList:
    """Return the decoder layers of a transformers causal LM (`model.layers`)."""
    layers = getattr(base_model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(base_model).__name__} has no decoder layer list at `get_decoder().layers`. HookMoE supports "
            "decoder-only causal LMs laid out like Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE."
        )
    return layers


def load_balancing_loss_per_layer(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k_per_router: list[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the Switch-Transformer load-balancing loss with one k per MoE layer.

    The loss is `num_experts * sum_e f_e * P_e`, where `f_e` is the fraction of (token, slot) assignments that go
    to expert `e` and `P_e` is its mean router probability, both averaged over all MoE layers and tokens. The
    transformers MoE models compute this loss with the config's global k, but this variant counts each layer's
    assignments with the k that layer actually routes with. `router_logits` and `top_k_per_router` list the MoE
    layers in forward order. Padding positions are left out when `attention_mask` covers the same tokens as the
    router logits (it does not during cached decoding, where the mask also covers past tokens).
    """
    device = router_logits[0].device
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows = torch.zeros((), dtype=torch.float32, device=device)

    for layer_logits, k in zip(router_logits, top_k_per_router):
        probs = torch.softmax(layer_logits.to(device).float(), dim=-1)
        _, selected = torch.topk(probs, k, dim=-1)
        if attention_mask is not None and attention_mask.numel() == probs.shape[0]:
            row_weight = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        else:
            row_weight = torch.ones(probs.shape[0], dtype=torch.float32, device=device)
        tokens_per_expert_sum = tokens_per_expert_sum.scatter_add(
            0, selected.reshape(-1), row_weight.repeat_interleave(k)
        )
        router_prob_sum = router_prob_sum + (probs * row_weight.unsqueeze(-1)).sum(dim=0)
        total_rows = total_rows + row_weight.sum()

    tokens_per_expert = tokens_per_expert_sum / total_rows
    router_prob_per_expert = router_prob_sum / total_rows
    return num_experts * torch.sum(tokens_per_expert * router_prob_per_expert)


def _check_base_config_matches(expected: AutoConfig, actual: AutoConfig, source: str, base_name: str) -> None:
    """Raise if the base loaded from `base_name` differs in shape from the base the checkpoint was saved for."""
    mismatches = []
    for field in _BASE_FIELDS_TO_MATCH:
        expected_value = getattr(expected, field, None)
        actual_value = getattr(actual, field, None)
        if expected_value != actual_value:
            mismatches.append(f"{field}: saved for {expected_value!r}, base has {actual_value!r}")
    if mismatches:
        raise ValueError(
            f"The HookMoE checkpoint {source} was saved for another base than {base_name!r} "
            f"({'; '.join(mismatches)}). Pass the matching base with `base_model=...`."
        )


def _build_config(**fields) -> HookMoEConfig:
    """Build a `HookMoEConfig`, raising the validator's own `ValueError` instead of the strict-dataclass wrapper."""
    try:
        return HookMoEConfig(**fields)
    except StrictDataclassClassValidationError as error:
        if isinstance(error.__cause__, (ValueError, TypeError)):
            raise error.__cause__ from None
        raise


class HookMoEPreTrainedModel(PreTrainedModel):
    config: HookMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # Hooks initialise themselves in `HookMoEHook.reset_parameters`, because for models defined outside
        # transformers this method is skipped on modules without parameters of their own (such as a hook).
        # The base is attached after `post_init`, so its weights are never touched here.
        pass


class HookMoEForCausalLM(HookMoEPreTrainedModel, GenerationMixin):
    r"""
    An MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE) whose routers use the reduced top-k schedule of
    `config.top_k_per_layer`, with a trainable [`HookMoEHook`] on the input of each layer in `config.hook_layers`.

    The base model is `self.model` and is frozen. [`save_pretrained`] writes only the config and the hook weights;
    [`from_pretrained`] loads the base named in the config and applies the schedule and the hooks to it.

    Example:

    ```python
    >>> from edsd_hf import HookMoEForCausalLM
    >>> model = HookMoEForCausalLM.from_base("path/to/moe-base", top_k=1, hook_layers=[2])
    >>> model.save_pretrained("hookmoe-out")  # config.json and model.safetensors with the hook weights only
    >>> model = HookMoEForCausalLM.from_pretrained("hookmoe-out")
    ```
    """

    def __init__(self, config: HookMoEConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        base_config = config.text_config
        eps = getattr(base_config, "rms_norm_eps", None) or 1e-6
        self.hooks = nn.ModuleDict(
            {
                str(i): HookMoEHook(
                    base_config.hidden_size,
                    config.hook_rank,
                    config.hook_activation,
                    config.hook_input_norm,
                    eps,
                    config.hook_initializer_range,
                ).float()
                for i in config.hook_layers
            }
        )
        # Initialise the hooks before the base is attached, so that a loaded base is never re-initialised.
        self.post_init()

        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(copy.deepcopy(base_config))
        if getattr(base_model, "_hookmoe_attached", False):
            # A second wrapper would stack its pre-hooks on the first one's and fight over the routers' top-k.
            raise ValueError(
                "This base model is already wrapped by a HookMoEForCausalLM. Call `unload()` on that wrapper first, "
                "or load a fresh copy of the base."
            )
        _check_base_config_matches(base_config, base_model.config, "config", base_model.name_or_path)
        self.model = base_model
        self.generation_config = base_model.generation_config
        # Trainer resumes from `model.safetensors` with `load_state_dict(strict=False)`: base keys are expected
        # to be missing there.
        self._keys_to_ignore_on_save = {f"model.{key}" for key in base_model.state_dict()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

        self._routers = find_routers(base_model)
        if sorted(self._routers) != config.moe_layers:
            raise ValueError(
                f"{type(base_model).__name__} has routers (`layer.mlp.gate.top_k`) in layers {sorted(self._routers)}, "
                f"but its config declares MoE layers {config.moe_layers}. HookMoE cannot set the top-k of this base."
            )
        self._original_routing = {
            i: (router.top_k, getattr(router, "norm_topk_prob", None)) for i, router in self._routers.items()
        }

        layers = decoder_layers(base_model)
        for i in config.hook_layers:
            layer_device = next(layers[i].parameters()).device
            self.hooks[str(i)].to(layer_device)
        self._hooks_enabled = True
        self._hook_handles = [
            layers[i].register_forward_pre_hook(functools.partial(self._run_hook, i), with_kwargs=True)
            for i in config.hook_layers
        ]
        self._set_routing(config.top_k_per_layer, config.norm_topk_prob)
        base_model._hookmoe_attached = True

    def unload(self) -> PreTrainedModel:
        """Detach the hooks, restore the original top-k and return the base, which is unmodified afterwards.

        The base stays frozen (`requires_grad=False`). This wrapper must not be used after `unload()`.
        """
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for i, (k, norm_topk_prob) in self._original_routing.items():
            self._set_routing_for_layer(i, k, norm_topk_prob)
        self.model._hookmoe_attached = False
        return self.model

    # ------------------------------------------------------------------ construction and persistence

    @classmethod
    def from_base(
        cls,
        base_model: str | os.PathLike | PreTrainedModel,
        top_k: int | list[int | None] | str | None = None,
        hook_layers: list[int] | None = None,
        *,
        hook_rank: int = 64,
        hook_activation: str = "silu",
        hook_input_norm: bool = True,
        norm_topk_prob: bool | None = None,
        **base_kwargs,
    ) -> "HookMoEForCausalLM":
        """Wrap an MoE base with a reduced top-k schedule and untrained (identity) hooks.

        Args:
            base_model: Hub id or local directory of the base, or an already loaded causal LM.
            top_k: Experts per token: an int for every MoE layer, a list with one entry per decoder layer, or a
                rule such as `"upper half k=1"`. `None` keeps the base's k.
            hook_layers: 0-based decoder layers whose input gets a hook.
            hook_rank, hook_activation, hook_input_norm, norm_topk_prob: see [`HookMoEConfig`].
            base_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when `base_model` is a name or path
                (for example `dtype`, `device_map`, `attn_implementation`, `revision`).
        """
        hook_options = {
            "top_k_schedule": list(top_k) if isinstance(top_k, tuple) else top_k,
            "hook_layers": list(hook_layers or []),
            "hook_rank": hook_rank,
            "hook_activation": hook_activation,
            "hook_input_norm": hook_input_norm,
            "norm_topk_prob": norm_topk_prob,
        }
        if isinstance(base_model, HookMoEForCausalLM):
            raise TypeError("base_model is already a HookMoEForCausalLM. Pass its `.model` or the original base.")
        if isinstance(base_model, PreTrainedModel):
            if base_kwargs:
                raise TypeError(
                    f"Loading options {sorted(base_kwargs)} apply only when base_model is a name or path, not a "
                    "loaded model."
                )
            base_name = base_model.name_or_path or None
            if base_name is None:
                logger.warning(
                    "The base model has no name_or_path, so the saved config cannot name it: pass "
                    "`base_model=` to HookMoEForCausalLM.from_pretrained when reloading."
                )
            config = _build_config(
                text_config=copy.deepcopy(base_model.config), base_model_name_or_path=base_name, **hook_options
            )
            return cls(config, base_model=base_model)
        if not isinstance(base_model, (str, os.PathLike)):
            raise TypeError(
                f"base_model must be a Hub id, a local path or a PreTrainedModel, got {type(base_model).__name__}."
            )

        base_name = os.fspath(base_model)
        if os.path.isdir(base_name):
            # An absolute path keeps the saved config valid when it is loaded from another working directory.
            base_name = os.path.abspath(base_name)
        config_kwargs = {key: base_kwargs[key] for key in (*_BASE_HUB_KWARGS, "revision") if key in base_kwargs}
        # Validating the config first rejects a dense base or a bad schedule before any weight is loaded.
        config = _build_config(
            text_config=AutoConfig.from_pretrained(base_name, **config_kwargs),
            base_model_name_or_path=base_name,
            **hook_options,
        )
        base = AutoModelForCausalLM.from_pretrained(base_name, **base_kwargs)
        config.text_config = copy.deepcopy(base.config)
        return cls(config, base_model=base)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: HookMoEConfig | None = None,
        base_model: str | os.PathLike | PreTrainedModel | None = None,
        **kwargs,
    ) -> "HookMoEForCausalLM":
        """Load a HookMoE checkpoint: load its base, apply the saved schedule and load the hook weights.

        Args:
            pretrained_model_name_or_path: Directory or Hub id written by [`save_pretrained`].
            config: A `HookMoEConfig` to use instead of the saved one.
            base_model: The base to load onto (name, path or loaded model). Defaults to
                `config.base_model_name_or_path`.
            kwargs: Hub options (`cache_dir`, `token`, `revision`, ...) locate the HookMoE files. All other options
                (`dtype`, `device_map`, `attn_implementation`, ...) are passed to the base's `from_pretrained`.
        """
        if model_args:
            raise TypeError(f"HookMoEForCausalLM.from_pretrained takes no extra positional arguments, got {model_args}.")
        for key in _AUTO_CLASS_KWARGS:
            kwargs.pop(key, None)
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        source = os.fspath(pretrained_model_name_or_path)

        if config is None:
            config = HookMoEConfig.from_pretrained(source, **hub_kwargs)
        elif not isinstance(config, HookMoEConfig):
            raise TypeError(f"config must be a HookMoEConfig, got {type(config).__name__}.")

        if base_model is None:
            base_model = config.base_model_name_or_path
            if not base_model:
                raise ValueError(
                    f"The HookMoE config in {source} does not name its base (base_model_name_or_path is empty). "
                    "Pass the base with `base_model=...`."
                )
        if isinstance(base_model, PreTrainedModel):
            if kwargs:
                raise TypeError(f"Loading options {sorted(kwargs)} apply only when the base is loaded by name or path.")
            base = base_model
            base_name = base.name_or_path
        else:
            base_name = os.fspath(base_model)
            base_hub_kwargs = {key: hub_kwargs[key] for key in _BASE_HUB_KWARGS if key in hub_kwargs}
            base = AutoModelForCausalLM.from_pretrained(base_name, **base_hub_kwargs, **kwargs)
        _check_base_config_matches(config.text_config, base.config, source, base_name)

        model = cls(config, base_model=base)
        weights_file = cached_file(source, SAFE_WEIGHTS_NAME, **hub_kwargs)
        model.load_hook_state_dict(safetensors.torch.load_file(weights_file), source=source)
        model.name_or_path = source
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write the HookMoE config, the base's generation config and the hook weights (not the base weights).

        `state_dict` may be a full state dict of this model, as the Trainer passes it. Only the `hooks.` entries
        are written. Other keyword arguments of `PreTrainedModel.save_pretrained` are accepted and ignored, because
        the hook weights fit in one small safetensors file.
        """
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported by HookMoEForCausalLM: call "
                "model.push_to_hub(repo_id), which saves the config and hooks to a temporary directory and uploads it."
            )
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        if not is_main_process:
            return

        if state_dict is None:
            state_dict = self.state_dict()
        hook_state = {
            key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items() if key.startswith("hooks.")
        }
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        safetensors.torch.save_file(
            hook_state, os.path.join(save_directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"}
        )
        logger.info(f"Saved HookMoE config and {len(hook_state)} hook tensors to {save_directory}.")

    def hook_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the hook weights under the keys `save_pretrained` writes (`hooks.<layer>.<parameter>`)."""
        return {key: tensor for key, tensor in self.state_dict().items() if key.startswith("hooks.")}

    def load_hook_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
        """Load hook weights saved by [`save_pretrained`], checking layers and shapes against this model."""
        expected = self.hook_state_dict()
        unexpected = sorted(set(state_dict) - set(expected))
        missing = sorted(set(expected) - set(state_dict))
        if unexpected or missing:
            raise ValueError(
                f"The hook weights in {source} do not match hook_layers={self.config.hook_layers}: unexpected keys "
                f"{unexpected[:6]}, missing keys {missing[:6]}. They were saved for another hook layout; load them "
                "with the config they were saved with."
            )
        for key, tensor in state_dict.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"The hook weight {key} in {source} has shape {tuple(tensor.shape)}, but this model expects "
                    f"{tuple(expected[key].shape)} (base hidden_size={self.config.text_config.hidden_size}, "
                    f"hook_rank={self.config.hook_rank}). The hooks were saved for another base or hook_rank."
                )
        self.hooks.load_state_dict({key[len("hooks.") :]: tensor for key, tensor in state_dict.items()})

    # ------------------------------------------------------------------ routing and hooks

    def _run_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of decoder layer `layer_idx`: replace its hidden-states input with the hook's output."""
        if not self._hooks_enabled:
            return None
        hook = self.hooks[str(layer_idx)]
        if args:
            return (hook(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = hook(kwargs["hidden_states"])
        return args, kwargs

    def _set_routing(self, top_k_per_layer: list[int | None], norm_topk_prob: bool | None) -> None:
        for i, router in self._routers.items():
            k = top_k_per_layer[i]
            if not 1 <= k <= router.num_experts:
                raise ValueError(
                    f"Invalid top_k={k} for decoder layer {i}: it must be between 1 and the number of experts "
                    f"({router.num_experts})."
                )
            self._set_routing_for_layer(i, k, norm_topk_prob)

    @property
    def top_k_per_layer(self) -> list[int | None]:
        """The k each decoder layer's router uses right now (`None` for layers without a router)."""
        return [self._routers[i].top_k if i in self._routers else None for i in range(len(self.config.top_k_per_layer))]

    @contextlib.contextmanager
    def disable_hookmoe(self) -> Iterator["HookMoEForCausalLM"]:
        """Run as the unmodified base inside the block: original top-k in every layer and hooks bypassed.

        This is the teacher of [`HookMoETrainer`]: the same weights at full k, with no second copy in memory.
        """
        current = self.top_k_per_layer
        current_norm = {i: getattr(router, "norm_topk_prob", None) for i, router in self._routers.items()}
        hooks_were_enabled = self._hooks_enabled
        try:
            for i, router in self._routers.items():
                original_k, original_norm = self._original_routing[i]
                self._set_routing_for_layer(i, original_k, original_norm)
            self._hooks_enabled = False
            yield self
        finally:
            for i in self._routers:
                self._set_routing_for_layer(i, current[i], current_norm[i])
            self._hooks_enabled = hooks_were_enabled

    @contextlib.contextmanager
    def disable_hooks(self) -> Iterator["HookMoEForCausalLM"]:
        """Bypass the hooks inside the block while keeping the reduced top-k schedule."""
        hooks_were_enabled = self._hooks_enabled
        try:
            self._hooks_enabled = False
            yield self
        finally:
            self._hooks_enabled = hooks_were_enabled

    @contextlib.contextmanager
    def routing_schedule(self, top_k_per_layer: list[int | None]) -> Iterator["HookMoEForCausalLM"]:
        """Route with another per-layer schedule inside the block (one entry per decoder layer)."""
        if len(top_k_per_layer) != len(self.config.top_k_per_layer):
            raise ValueError(
                f"The schedule has {len(top_k_per_layer)} entries, but the base has "
                f"{len(self.config.top_k_per_layer)} decoder layers."
            )
        current = self.top_k_per_layer
        try:
            self._set_routing([k if k is not None else current[i] for i, k in enumerate(top_k_per_layer)], None)
            yield self
        finally:
            self._set_routing(current, None)

    def _set_routing_for_layer(self, layer_idx: int, k: int, norm_topk_prob: bool | None) -> None:
        router = self._routers[layer_idx]
        router.top_k = k
        if norm_topk_prob is not None and hasattr(router, "norm_topk_prob"):
            router.norm_topk_prob = norm_topk_prob
        mlp = decoder_layers(self.model)[layer_idx].mlp
        if hasattr(mlp, "top_k"):
            mlp.top_k = k

    @contextlib.contextmanager
    def capture_layer_outputs(self, layer_indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Record the output hidden states of the given decoder layers during forwards inside the block.

        Yields a dict from layer index to the last output of that layer. Under gradient checkpointing a layer
        runs again in the backward pass; the recorded tensor is the one of the forward pass.
        """
        outputs: dict[int, torch.Tensor] = {}
        layers = decoder_layers(self.model)

        def record(layer_idx, module, args, output):
            outputs[layer_idx] = output[0] if isinstance(output, tuple) else output

        handles = [layers[i].register_forward_hook(functools.partial(record, i)) for i in layer_indices]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    @property
    def active_experts_per_token(self) -> float:
        """Mean routed experts per token over the MoE layers, as currently routed (shared experts not counted)."""
        ks = [router.top_k for router in self._routers.values()]
        return sum(ks) / len(ks)

    # ------------------------------------------------------------------ model interface

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Run the base with the reduced schedule and the hooks; arguments and outputs are the base's.

        With `output_router_logits=True`, `aux_loss` (and its share of `loss`) is recomputed with the k each layer
        routes with, because the base's load-balancing loss assumes the config's global k.
        """
        if output_router_logits is None:
            output_router_logits = getattr(self.config.text_config, "output_router_logits", False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

        routed_ks = [router.top_k for _, router in sorted(self._routers.items())]
        base_k = self.config.original_top_k
        if output_router_logits and outputs.router_logits and any(k != base_k for k in routed_ks):
            aux_loss = load_balancing_loss_per_layer(
                outputs.router_logits, self.config.num_experts, routed_ks, attention_mask
            )
            coefficient = self.model.router_aux_loss_coef
            if outputs.loss is not None and outputs.aux_loss is not None:
                outputs.loss = outputs.loss + coefficient * (aux_loss - outputs.aux_loss.to(outputs.loss.device))
            outputs.aux_loss = aux_loss
        return outputs

    def generate(self, *args, **kwargs):
        """Generate with the base's `generate`, which runs through the reduced routers and the hooks.

        The schedule and hooks live on the base's modules, so the base's own generation loop, cache handling and
        assisted decoding apply unchanged. Arguments are those of `GenerationMixin.generate`.
        """
        return self.model.generate(*args, **kwargs)
