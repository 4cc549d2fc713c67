"""Configuration of HookMoE: an MoE base model run with fewer experts per token plus trainable hooks."""

import re

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

# MoE families whose router (`layer.mlp.gate`) and fused experts have been tested with HookMoE.
SUPPORTED_BASE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# One clause of a schedule rule: an optional layer selector followed by `k=<int>`.
_RULE_CLAUSE = re.compile(r"^\s*(?P<selector>.*?)\s*k\s*=\s*(?P<k>-?\d+)\s*$", re.IGNORECASE)


def moe_layer_indices(base_config: PreTrainedConfig) -> list[int]:
    """List the decoder layers of `base_config` that contain a routed MoE block.

    Qwen2-MoE and Qwen3-MoE can replace some MoE blocks with dense MLPs (`mlp_only_layers` and
    `decoder_sparse_step`). Mixtral and OLMoE route in every layer.
    """
    num_layers = base_config.num_hidden_layers
    num_experts = getattr(base_config, "num_experts", None) or 0
    if num_experts <= 0:
        return []
    mlp_only_layers = set(getattr(base_config, "mlp_only_layers", None) or [])
    sparse_step = getattr(base_config, "decoder_sparse_step", None) or 1
    return [i for i in range(num_layers) if i not in mlp_only_layers and (i + 1) % sparse_step == 0]


def _select_layers(selector: str, num_layers: int, rule: str) -> list[int]:
    """Map a rule selector such as `upper half` or `layers 2-5` to 0-based layer indices."""
    words = selector.lower().split()
    if not words or words == ["all"]:
        return list(range(num_layers))
    # The middle layer of an odd-depth model belongs to neither half.
    if words == ["upper", "half"]:
        return list(range(num_layers - num_layers // 2, num_layers))
    if words == ["lower", "half"]:
        return list(range(num_layers // 2))
    if len(words) == 2 and words[0] in ("upper", "lower") and words[1].isdigit():
        count = int(words[1])
        if not 0 < count <= num_layers:
            raise ValueError(
                f"Invalid top_k rule {rule!r}: '{selector}' selects {count} layers, but the base has "
                f"{num_layers} decoder layers. Use a count between 1 and {num_layers}."
            )
        return list(range(num_layers - count, num_layers)) if words[0] == "upper" else list(range(count))
    if len(words) == 2 and words[0] in ("layer", "layers"):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", words[1])
        if match is not None:
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if first > last or last >= num_layers:
                raise ValueError(
                    f"Invalid top_k rule {rule!r}: layer range '{words[1]}' is empty or out of range for a base "
                    f"with {num_layers} decoder layers (valid indices 0 to {num_layers - 1})."
                )
            return list(range(first, last + 1))
    raise ValueError(
        f"Invalid top_k rule {rule!r}: unknown layer selector '{selector}'. Use 'all', 'upper half', "
        "'lower half', 'upper N', 'lower N', 'layer I' or 'layers I-J', each followed by 'k=<int>', and "
        "separate clauses with ';'."
    )


def resolve_top_k_schedule(
    top_k: int | list[int | None] | str | None,
    num_layers: int,
    moe_layers: list[int],
    original_top_k: int,
    num_experts: int,
) -> list[int | None]:
    """Turn a top-k schedule into one k per decoder layer, `None` for layers without a router.

    `top_k` is one of:
      * `None`: keep the base's `original_top_k` everywhere;
      * an int: that k in every MoE layer;
      * a list with one entry per decoder layer, where `None` keeps the original k;
      * a rule string of `;`-separated clauses `<selector> k=<int>`, for example
        `"upper half k=1"` or `"lower half k=2; upper half k=1"`. Selectors: `all` (or none),
        `upper half`, `lower half`, `upper N`, `lower N`, `layer I`, `layers I-J` (inclusive). Later
        clauses override earlier ones, and layers no clause selects keep the original k.

    Raises `ValueError` naming the layer and value when a k is not between 1 and `num_experts`.
    """
    schedule: list[int | None] = [original_top_k if i in moe_layers else None for i in range(num_layers)]

    if top_k is None:
        pass
    elif isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, a list of ints or a rule string, got the bool {top_k!r}.")
    elif isinstance(top_k, int):
        for i in moe_layers:
            schedule[i] = top_k
    elif isinstance(top_k, (list, tuple)):
        if len(top_k) != num_layers:
            raise ValueError(
                f"top_k list has {len(top_k)} entries, but the base has {num_layers} decoder layers. Give one "
                "entry per layer (None keeps the original k), or use an int or a rule string."
            )
        for i, k in enumerate(top_k):
            if k is not None and i in moe_layers:
                schedule[i] = k
            elif k is not None and k != original_top_k:
                logger.warning(f"top_k[{i}]={k} is ignored because decoder layer {i} has no MoE router.")
    elif isinstance(top_k, str):
        clauses = [clause for clause in top_k.split(";") if clause.strip()]
        if not clauses:
            raise ValueError(f"Invalid top_k rule {top_k!r}: it contains no clause of the form '<selector> k=<int>'.")
        for clause in clauses:
            match = _RULE_CLAUSE.match(clause)
            if match is None:
                raise ValueError(
                    f"Invalid top_k rule {top_k!r}: clause '{clause.strip()}' does not end in 'k=<int>'. "
                    "Example: 'upper half k=1'."
                )
            k = int(match.group("k"))
            for i in _select_layers(match.group("selector"), num_layers, top_k):
                if i in moe_layers:
                    schedule[i] = k
    else:
        raise TypeError(f"top_k must be an int, a list of ints or a rule string, got {type(top_k).__name__}.")

    for i, k in enumerate(schedule):
        if k is not None and not 1 <= k <= num_experts:
            raise ValueError(
                f"Invalid top_k={k} for decoder layer {i}: it must be between 1 and the number of experts "
                f"({num_experts}). Lower it, or use None to keep the original k ({original_top_k})."
            )
    return schedule


@strict
class HookMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`HookMoEForCausalLM`]: an MoE causal LM whose routers select fewer experts per token
    than the base was trained with, and whose quality loss is compensated by small trainable hooks applied to
    the input of selected decoder layers.

    Build it with [`HookMoEForCausalLM.from_base`], which fills the base fields from the base model.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Config of the base MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE). Stored so that a saved HookMoE
            checkpoint can be checked against the base it is loaded onto.
        base_model_name_or_path (`str`, *optional*):
            Hub id or local directory of the base model. [`HookMoEForCausalLM.from_pretrained`] loads the base
            from here unless `base_model` is passed.
        top_k_schedule (`int`, `list[int | None]` or `str`, *optional*):
            Experts per token as requested by the user: one k for every MoE layer, one entry per decoder layer, or
            a rule such as `"upper half k=1"` (see [`resolve_top_k_schedule`]). `None` keeps the original k.
        top_k_per_layer (`list[int | None]`, *optional*):
            The resolved schedule: one k per decoder layer, `None` for layers without a router. Computed from
            `top_k` when not given.
        original_top_k (`int`, *optional*):
            Experts per token the base was trained with (`num_experts_per_tok` of `text_config`).
        num_experts (`int`, *optional*):
            Routed experts per MoE layer in the base. Shared experts (Qwen2-MoE) are not counted.
        hook_layers (`list[int]`, *optional*, defaults to `[]`):
            0-based indices of the decoder layers whose input passes through a hook.
        hook_rank (`int`, *optional*, defaults to 64):
            Width of the hook's bottleneck.
        hook_activation (`str`, *optional*, defaults to `"silu"`):
            Activation between the hook's down and up projections, a key of `transformers.activations.ACT2FN`.
            `"linear"` makes the hook a residual low-rank linear map.
        hook_input_norm (`bool`, *optional*, defaults to `True`):
            Whether the hook applies an RMSNorm to its input before the down projection. The residual stream's
            scale grows with depth, so the norm lets one learning rate suit any hooked layer.
        hook_initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the hook's down projection. The up projection
            always starts at zero, so an untrained hook returns its input unchanged.
        norm_topk_prob (`bool`, *optional*):
            Whether the routers renormalise the selected experts' weights to sum to 1 while the reduced schedule is
            active. `None` keeps the base's behaviour. Mixtral always renormalises and accepts only `None` or `True`.
    """

    model_type = "hookmoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="mixtral")}
    keys_to_ignore_at_inference = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    top_k_schedule: int | list[int | None] | str | None = None
    top_k_per_layer: list[int | None] | None = None
    original_top_k: int | None = None
    num_experts: int | None = None
    hook_layers: list[int] | None = None
    hook_rank: int = 64
    hook_activation: str = "silu"
    hook_input_norm: bool = True
    hook_initializer_range: float = 0.02
    norm_topk_prob: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        base = self.text_config
        if self.original_top_k is None:
            self.original_top_k = getattr(base, "num_experts_per_tok", None)
        if self.num_experts is None:
            self.num_experts = getattr(base, "num_experts", None)
        if self.hook_layers is None:
            self.hook_layers = []
        if self.top_k_per_layer is None and self.num_experts and self.original_top_k:
            self.top_k_per_layer = resolve_top_k_schedule(
                self.top_k_schedule,
                base.num_hidden_layers,
                moe_layer_indices(base),
                self.original_top_k,
                self.num_experts,
            )

    def validate_architecture(self):
        """Check the base is an MoE model and the schedule and hooks fit it (called by `@strict` validation)."""
        base = self.text_config
        base_type = getattr(base, "model_type", None)
        if not self.num_experts or not moe_layer_indices(base):
            raise ValueError(
                f"The base model_type {base_type!r} is not a Mixture-of-Experts model: its config has no routed "
                f"experts (num_experts={self.num_experts}). HookMoE needs an MoE base such as "
                f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}."
            )
        if base_type not in SUPPORTED_BASE_MODEL_TYPES:
            logger.warning(
                f"Base model_type {base_type!r} has not been tested with HookMoE (tested: "
                f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}). Its routers must expose `top_k` as `layer.mlp.gate.top_k`."
            )
        if not 1 <= self.original_top_k <= self.num_experts:
            raise ValueError(
                f"original_top_k={self.original_top_k} must be between 1 and num_experts={self.num_experts}."
            )

        num_layers = base.num_hidden_layers
        moe_layers = moe_layer_indices(base)
        if len(self.top_k_per_layer) != num_layers:
            raise ValueError(
                f"top_k_per_layer has {len(self.top_k_per_layer)} entries, but the base has {num_layers} decoder "
                "layers. Remove top_k_per_layer from the config to recompute it from top_k."
            )
        for i, k in enumerate(self.top_k_per_layer):
            if (k is None) != (i not in moe_layers):
                raise ValueError(
                    f"top_k_per_layer[{i}]={k!r} does not match the base: layer {i} "
                    f"{'has' if i in moe_layers else 'has no'} MoE router. Use None exactly for dense layers."
                )
            if k is not None and not 1 <= k <= self.num_experts:
                raise ValueError(
                    f"Invalid top_k={k} for decoder layer {i}: it must be between 1 and the number of experts "
                    f"({self.num_experts})."
                )

        out_of_range = [i for i in self.hook_layers if not 0 <= i < num_layers]
        if out_of_range:
            raise ValueError(
                f"hook_layers {out_of_range} are out of range for a base with {num_layers} decoder layers "
                f"(valid indices 0 to {num_layers - 1})."
            )
        if len(set(self.hook_layers)) != len(self.hook_layers):
            raise ValueError(f"hook_layers must be distinct, got {self.hook_layers}.")
        if self.hook_rank < 1:
            raise ValueError(f"hook_rank must be at least 1, got {self.hook_rank}.")
        if self.hook_activation not in ACT2FN:
            raise ValueError(
                f"Unknown hook_activation {self.hook_activation!r}: use a key of transformers.activations.ACT2FN "
                "such as 'silu', 'gelu', 'relu' or 'linear'."
            )
        if base_type == "mixtral" and self.norm_topk_prob is False:
            raise ValueError(
                "norm_topk_prob=False is not possible on a Mixtral base: its router always renormalises the top-k "
                "weights. Use None or True."
            )

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the base's decoder layers that contain a router."""
        return moe_layer_indices(self.text_config)

    @property
    def active_experts_per_token(self) -> float:
        """Mean routed experts per token over the MoE layers under the reduced schedule."""
        ks = [k for k in self.top_k_per_layer if k is not None]
        return sum(ks) / len(ks)

    @property
    def active_experts_reduction(self) -> float:
        """Fraction of routed expert evaluations per token removed by the schedule (0.5 means half)."""
        return 1.0 - self.active_experts_per_token / self.original_top_k
