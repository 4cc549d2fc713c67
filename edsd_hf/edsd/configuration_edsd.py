"""Configuration of the EDSD draft model."""

import copy

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Target families whose decoder exposes per-layer hidden states through `output_hidden_states`
# and whose generation path has been tested with the EDSD candidate generator.
SUPPORTED_TARGET_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

FUSION_TYPES = ("edfuse", "concat")

# Number of target layers each fusion reads: EDSD reads two upper layers, the EAGLE-3 style
# baseline reads a low, a middle and a high layer.
NUM_TARGET_LAYERS = {"edfuse": 2, "concat": 3}


def check_supported_target(text_config: PreTrainedConfig) -> str:
    """Return the target's `model_type`, or raise a ValueError if EDSD drafts do not support that family."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_TARGET_MODEL_TYPES:
        raise ValueError(
            f"Target model_type {model_type!r} is not supported by EDSD drafts. Supported families: "
            f"{', '.join(SUPPORTED_TARGET_MODEL_TYPES)}."
        )
    return model_type


def default_target_layer_ids(num_target_layers: int, fusion: str = "edfuse") -> list[int]:
    """Pick the target decoder layers whose outputs feed the draft.

    `edfuse` takes two upper layers: about two thirds of the depth and the second-to-last layer
    (layers 23 and 34 of a 36-layer target). The last layer is avoided because transformers
    returns it after the final norm. `concat` follows EAGLE-3 (layers 2, N/2 and N-3) on deep
    targets and spreads three layers evenly over shallow ones.
    """
    if fusion not in FUSION_TYPES:
        raise ValueError(f"Unknown fusion {fusion!r}: expected one of {FUSION_TYPES}.")
    needed = NUM_TARGET_LAYERS[fusion]
    if num_target_layers < needed:
        raise ValueError(
            f"fusion={fusion!r} reads {needed} distinct target layers, but the target has only "
            f"{num_target_layers} decoder layers. Use a deeper target or fusion='edfuse'."
        )

    if fusion == "edfuse":
        high = num_target_layers - 2 if num_target_layers >= 3 else num_target_layers - 1
        middle = max(0, min((2 * num_target_layers) // 3 - 1, high - 1))
        return [middle, high]

    if num_target_layers >= 8:
        return [2, num_target_layers // 2, num_target_layers - 3]
    return [0, num_target_layers // 2, num_target_layers - 1]


@strict
class EdsdConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EdsdDraftModel`]: a one-layer draft that reads hidden states of a target
    model and proposes tokens for speculative decoding.

    Build it from the target's config with [`EdsdConfig.from_target_config`], which copies the
    attention shape, RoPE settings and `max_position_embeddings` from the target so that the draft
    uses the same positions as the target.

    Args:
        vocab_size (`int`):
            Vocabulary size of the target. Draft logits are returned in this vocabulary.
        draft_vocab_size (`int`, *optional*):
            Number of tokens the draft LM head predicts (the most frequent target tokens). Defaults to
            `vocab_size`.
        hidden_size (`int`):
            Hidden size of the target, which is also the draft's hidden size.
        intermediate_size (`int`):
            Width of the draft decoder layer's MLP.
        num_hidden_layers (`int`, defaults to 1):
            Number of draft decoder layers. EDSD and EAGLE-3 use one.
        num_attention_heads, num_key_value_heads, head_dim:
            Attention shape of the draft layer.
        hidden_act (`str`): Activation of the MLP and of the EDFuse gate.
        rms_norm_eps (`float`): Epsilon of every RMSNorm.
        max_position_embeddings (`int`): Longest sequence the draft accepts, copied from the target.
        rope_parameters (`dict`): RoPE settings, copied from the target.
        fusion (`str`, defaults to `"edfuse"`):
            How the draft fuses target features with the token embedding: `"edfuse"` (EDSD: two target
            layers, the feature gates the normed embedding) or `"concat"` (EAGLE-3: three target layers,
            normed embedding and normed feature concatenated into a 2H-wide attention input).
        target_layer_ids (`list[int]`, *optional*):
            0-based indices of the target decoder layers whose outputs feed the draft. Defaults to
            [`default_target_layer_ids`].
        target_num_hidden_layers (`int`): Depth of the target, used to validate `target_layer_ids`.
        target_model_type (`str`): `model_type` of the target the draft was built for.
    """

    model_type = "edsd"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    draft_vocab_size: int | None = None
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    fusion: str = "edfuse"
    target_layer_ids: list[int] | None = None
    target_num_hidden_layers: int | None = None
    target_model_type: str | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.target_num_hidden_layers is None:
            # A config built by hand without a target: assume a target deep enough for the defaults.
            self.target_num_hidden_layers = max(NUM_TARGET_LAYERS.get(self.fusion, 2), 2)
        if self.target_layer_ids is None and self.fusion in FUSION_TYPES:
            self.target_layer_ids = default_target_layer_ids(self.target_num_hidden_layers, self.fusion)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check the draft's own shapes and its target layer ids (called by `@strict` validation)."""
        if self.fusion not in FUSION_TYPES:
            raise ValueError(f"Unknown fusion {self.fusion!r}: expected one of {FUSION_TYPES}.")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be at least 1, got {self.num_hidden_layers}.")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} must be between 1 and the target vocab_size "
                f"({self.vocab_size})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )

        layer_ids = list(self.target_layer_ids)
        expected = NUM_TARGET_LAYERS[self.fusion]
        if len(layer_ids) != expected:
            raise ValueError(
                f"fusion={self.fusion!r} reads exactly {expected} target layers, got target_layer_ids={layer_ids}."
            )
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"target_layer_ids must be distinct, got {layer_ids}.")
        out_of_range = [i for i in layer_ids if not 0 <= i < self.target_num_hidden_layers]
        if out_of_range:
            raise ValueError(
                f"target_layer_ids {out_of_range} are out of range for a target with "
                f"{self.target_num_hidden_layers} decoder layers (valid: 0 to {self.target_num_hidden_layers - 1})."
            )

    @property
    def target_feature_size(self) -> int:
        """Width of the concatenated target features the draft reads (layers times hidden size)."""
        return len(self.target_layer_ids) * self.hidden_size

    @classmethod
    def from_target_config(
        cls,
        target_config: PreTrainedConfig,
        target_layer_ids: list[int] | None = None,
        draft_vocab_size: int | None = None,
        fusion: str = "edfuse",
        **overrides,
    ) -> "EdsdConfig":
        """Build a draft config that fits `target_config`.

        Copies the target's hidden size, attention shape, MLP width, activation, norm epsilon,
        vocabulary, special tokens, RoPE settings and `max_position_embeddings`. A draft whose
        position limit is shorter than the target's silently loses acceptance on long prompts, so
        the limit is never shortened here. `overrides` set any other field.
        """
        text_config = target_config.get_text_config()
        model_type = check_supported_target(text_config)

        num_layers = text_config.num_hidden_layers
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(num_layers, fusion)

        num_heads = text_config.num_attention_heads
        fields = {
            "vocab_size": text_config.vocab_size,
            "draft_vocab_size": draft_vocab_size if draft_vocab_size is not None else text_config.vocab_size,
            "hidden_size": text_config.hidden_size,
            "intermediate_size": text_config.intermediate_size,
            "num_attention_heads": num_heads,
            "num_key_value_heads": getattr(text_config, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
            "hidden_act": text_config.hidden_act,
            "rms_norm_eps": text_config.rms_norm_eps,
            "max_position_embeddings": text_config.max_position_embeddings,
            "rope_parameters": copy.deepcopy(text_config.rope_parameters),
            "pad_token_id": text_config.pad_token_id,
            "bos_token_id": text_config.bos_token_id,
            "eos_token_id": text_config.eos_token_id,
            "initializer_range": getattr(text_config, "initializer_range", 0.02),
            "fusion": fusion,
            "target_layer_ids": list(target_layer_ids),
            "target_num_hidden_layers": num_layers,
            "target_model_type": model_type,
        }
        fields.update(overrides)
        return cls(**fields)
