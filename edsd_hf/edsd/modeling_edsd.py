"""EDSD draft model: one decoder layer that reads a target model's hidden states.

At position t the draft receives the target's hidden states at t (features of the prefix up to
token t) and the embedding of token t+1, and predicts token t+2. While drafting several tokens
ahead it feeds its own output hidden state back in place of the target features, so training
unrolls the same recurrence ("training-time test", see `EdsdDraftModel.forward_unrolled`).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)
from transformers.utils import ModelOutput, logging

from .cache import EdsdDraftCache
from .configuration_edsd import EdsdConfig, check_supported_target


logger = logging.get_logger(__name__)

# Drafting defaults written into a new draft's generation config; users change them the way they
# change HF assistants: `draft.generation_config.num_assistant_tokens = 8`.
DEFAULT_DRAFTING = {
    "num_assistant_tokens": 6,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.0,
}


@dataclass
class EdsdDraftOutput(ModelOutput):
    """
    Output of [`EdsdDraftModel`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, draft_vocab_size)`):
            Scores over the draft vocabulary. Map them to the target vocabulary with
            [`EdsdDraftModel.map_logits_to_target_vocab`].
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Output of the last decoder layer before the final norm: the feature fed back in place of the
            target's features at the next drafting step.
        cache ([`EdsdDraftCache`], *optional*): The draft's keys and values, when `use_cache=True`.
    """

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    cache: EdsdDraftCache | None = None


class EdsdEdFuse(nn.Module):
    """EDFuse: the target feature gates the normed token embedding, in SwiGLU form.

    `feature + down(act(gate(feature)) * up(norm(embedding)))`, H wide, starts the draft's residual
    stream. The token is the primary signal and the feature decides which of its directions pass,
    which is how EDSD aligns the draft to the target token by token. The feature is also added
    back: without that path, a freshly initialised gate (act(small) ~ 0) blocks the feature, and
    on tiny test targets the draft reached about a third of the top-1 accuracy after 200 steps.
    """

    def __init__(self, config: EdsdConfig):
        super().__init__()
        self.embedding_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.down_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, feature: torch.Tensor, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, None]:
        gated = self.act_fn(self.gate_proj(feature)) * self.up_proj(self.embedding_norm(inputs_embeds))
        return feature + self.down_proj(gated), None


class EdsdConcatFusion(nn.Module):
    """EAGLE-3 style fusion: normed embedding and normed feature concatenated as a 2H attention input.

    The residual stream starts from the (un-normed) feature.
    """

    def __init__(self, config: EdsdConfig):
        super().__init__()
        self.embedding_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feature_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, feature: torch.Tensor, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_input = torch.cat([self.embedding_norm(inputs_embeds), self.feature_norm(feature)], dim=-1)
        return feature, attention_input


FUSION_CLASSES = {"edfuse": EdsdEdFuse, "concat": EdsdConcatFusion}


class EdsdAttention(nn.Module):
    """Multi-head attention with RoPE and grouped key/value heads, on an explicit boolean mask.

    The mask is always built by the caller because training-time test needs a mask that no causal
    helper produces (see `build_unrolled_attention_mask`).
    """

    def __init__(self, config: EdsdConfig, layer_idx: int, input_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        attention_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: EdsdDraftCache | None = None,
    ) -> torch.Tensor:
        batch_size, query_length, _ = attention_input.shape
        query_states = self.q_proj(attention_input).view(batch_size, query_length, -1, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(attention_input).view(batch_size, query_length, -1, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(attention_input).view(batch_size, query_length, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attention_output = F.scaled_dot_product_attention(
            query_states,
            key_states,
            value_states,
            attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attention_output = attention_output.transpose(1, 2).reshape(batch_size, query_length, -1)
        return self.o_proj(attention_output)


class EdsdDecoderLayer(nn.Module):
    """Pre-norm decoder layer. The first layer of a `concat` draft attends over the 2H fused input."""

    def __init__(self, config: EdsdConfig, layer_idx: int):
        super().__init__()
        takes_concat_input = layer_idx == 0 and config.fusion == "concat"
        attention_input_size = 2 * config.hidden_size if takes_concat_input else config.hidden_size
        self.self_attn = EdsdAttention(config, layer_idx, attention_input_size)
        self.mlp = LlamaMLP(config)
        # A concat draft's first layer gets an already-normed attention input from the fusion.
        self.input_layernorm = None if takes_concat_input else LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        attention_input: torch.Tensor | None = None,
        cache: EdsdDraftCache | None = None,
    ) -> torch.Tensor:
        if attention_input is None:
            attention_input = self.input_layernorm(hidden_states)
        hidden_states = hidden_states + self.self_attn(attention_input, position_embeddings, attention_mask, cache)
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


def build_causal_attention_mask(
    query_length: int, past_length: int, padding_mask: torch.Tensor | None, batch_size: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask `[batch, 1, query, past + query]`, True where a query may attend, or None when all may.

    `padding_mask` is the usual 2D mask over all `past + query` positions (1 = real token).
    """
    if query_length == 1 and padding_mask is None:
        # One new token without padding attends to every cached key, so SDPA needs no mask.
        return None
    key_length = past_length + query_length
    query_positions = torch.arange(past_length, key_length, device=device)[:, None]
    key_positions = torch.arange(key_length, device=device)[None, :]
    mask = (key_positions <= query_positions)[None, None].expand(batch_size, 1, -1, -1)
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
        # A padded query with no visible key would give NaN: let it see itself.
        mask = mask | (key_positions == query_positions)[None, None]
    return mask


def build_unrolled_attention_mask(
    step: int, sequence_length: int, padding_mask: torch.Tensor | None, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask for unrolled step `step` over the keys of steps 0..step, `[batch, 1, T, (step + 1) * T]`.

    At step i the query at position t stands for a draft that was anchored at position t - i. It attends to
    the target-fed keys (step 0) up to t - i, and from each later step j only the key at t - i + j,
    the one speculative position that draft chain wrote at step j. This is exactly the context the
    draft has at inference after i drafting steps.
    """
    positions = torch.arange(sequence_length, device=device)
    query_positions = positions[:, None]
    blocks = [positions[None, :] <= query_positions - step]
    for previous_step in range(1, step + 1):
        blocks.append(positions[None, :] == query_positions - step + previous_step)
    mask = torch.cat(blocks, dim=-1)[None, None].expand(batch_size, 1, -1, -1)
    if padding_mask is not None:
        mask = mask & padding_mask.bool().repeat(1, step + 1)[:, None, None, :]
        # Keep each query's own key (diagonal of the current step's block) so that rows of padded
        # queries are never empty, which would give NaN in SDPA.
        own_key = torch.zeros(sequence_length, (step + 1) * sequence_length, dtype=torch.bool, device=device)
        own_key[positions, step * sequence_length + positions] = True
        mask = mask | own_key[None, None]
    return mask


class EdsdPreTrainedModel(PreTrainedModel):
    config_class = EdsdConfig
    config: EdsdConfig
    base_model_prefix = "draft"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["EdsdDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EdsdDraftModel):
            # Identity vocabulary mapping until a frequency-based one is set with `set_draft_vocab`.
            module.d2t.copy_(torch.arange(self.config.draft_vocab_size, dtype=torch.long))
            t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            t2d[: self.config.draft_vocab_size] = True
            module.t2d.copy_(t2d)


class EdsdDraftModel(EdsdPreTrainedModel):
    r"""
    EDSD draft for speculative decoding with `target.generate(..., assistant_model=draft)`.

    Layout: feature projection (`fc`, k*H -> H) of the concatenated target layers, fusion with the
    token embedding (EDFuse or the EAGLE-3 concatenation), `num_hidden_layers` decoder layers, final
    norm and an LM head over the draft vocabulary. `d2t[i]` is the target token id of draft token
    i, and `t2d[v]` is True when target token v is in the draft vocabulary.

    Token embeddings are not stored in the checkpoint: the draft uses the target's own embedding
    table, attached with [`attach_target`] (generation and the trainer attach it for you). This keeps
    draft checkpoints small and guarantees the draft embeds tokens exactly as its target does.
    """

    def __init__(self, config: EdsdConfig):
        super().__init__(config)
        self.fc = nn.Linear(config.target_feature_size, config.hidden_size, bias=False)
        self.fusion = FUSION_CLASSES[config.fusion](config)
        self.layers = nn.ModuleList([EdsdDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self._target_embeddings = None
        # RoPE cos/sin of the first positions, built and grown in eval mode (see `_position_embeddings`).
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.post_init()
        self._fill_drafting_defaults()

    def _fill_drafting_defaults(self) -> None:
        if self.generation_config is None:
            self.generation_config = GenerationConfig()
        for name, value in DEFAULT_DRAFTING.items():
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, value)

    @classmethod
    def can_generate(cls) -> bool:
        # True so that save_pretrained writes the drafting settings to generation_config.json.
        return True

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ) -> None:
        """Load the drafting settings saved with the draft (`from_pretrained` calls this)."""
        if generation_config is not None:
            self.generation_config = copy.deepcopy(generation_config)
        elif pretrained_model_name_or_path is not None:
            download_keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
            download_kwargs = {key: kwargs[key] for key in download_keys if kwargs.get(key) is not None}
            try:
                self.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **download_kwargs)
            except OSError:
                logger.info("No generation_config.json next to the draft; using the default drafting settings.")
        self._fill_drafting_defaults()

    def generate(self, *args, **kwargs):
        raise TypeError(
            "An EDSD draft is not a standalone language model: it needs the target's hidden states. Pass it to the "
            "target instead: `target.generate(**inputs, assistant_model=draft)`, after `import edsd_hf`."
        )

    # ----- target attachment -------------------------------------------------------------------

    def check_target_compatibility(self, target_config) -> None:
        """Raise a ValueError naming the mismatch if this draft cannot serve a target with `target_config`."""
        text_config = target_config.get_text_config()
        check_supported_target(text_config)
        checks = [
            ("hidden_size", text_config.hidden_size, self.config.hidden_size),
            ("vocab_size", text_config.vocab_size, self.config.vocab_size),
        ]
        for name, target_value, draft_value in checks:
            if target_value != draft_value:
                raise ValueError(
                    f"Draft does not fit the target: target {name}={target_value}, draft {name}={draft_value}. "
                    "Build the draft with EdsdConfig.from_target_config(target.config) and train it for this target."
                )
        num_layers = text_config.num_hidden_layers
        bad_layers = [i for i in self.config.target_layer_ids if not 0 <= i < num_layers]
        if bad_layers:
            raise ValueError(
                f"Draft reads target layers {self.config.target_layer_ids}, but the target has {num_layers} decoder "
                f"layers ({bad_layers} out of range). Use a draft trained for this target."
            )
        if num_layers != self.config.target_num_hidden_layers:
            logger.warning(
                "Draft was built for a %d-layer target but this target has %d layers; acceptance will be poor.",
                self.config.target_num_hidden_layers,
                num_layers,
            )

    def attach_target(self, target: PreTrainedModel) -> None:
        """Check `target` and use its input embeddings for the draft's tokens (not saved with the draft)."""
        self.check_target_compatibility(target.config)
        embeddings = target.get_input_embeddings()
        if embeddings.weight.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"Target input embeddings are {embeddings.weight.shape[-1]} wide, draft hidden_size is "
                f"{self.config.hidden_size}."
            )
        # Stored outside the module tree so the embedding table is neither saved nor trained with the draft.
        self.__dict__["_target_embeddings"] = embeddings

    def get_input_embeddings(self) -> nn.Module | None:
        return self._target_embeddings

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self._target_embeddings is None:
            raise ValueError(
                "The draft has no token embeddings: call `draft.attach_target(target)` first, or pass `inputs_embeds`."
            )
        # The head's weight gives the draft's device and dtype without walking every parameter.
        return self._target_embeddings(input_ids.to(self._target_embeddings.weight.device)).to(
            device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype
        )

    # ----- draft vocabulary --------------------------------------------------------------------

    def set_draft_vocab(self, draft_to_target: torch.LongTensor) -> None:
        """Set the draft vocabulary: `draft_to_target[i]` is the target id predicted by draft logit i."""
        draft_to_target = torch.as_tensor(draft_to_target, dtype=torch.long)
        if draft_to_target.shape != (self.config.draft_vocab_size,):
            raise ValueError(
                f"draft_to_target must have shape ({self.config.draft_vocab_size},), got {tuple(draft_to_target.shape)}."
            )
        if draft_to_target.unique().numel() != draft_to_target.numel():
            raise ValueError("draft_to_target contains duplicate target ids.")
        if draft_to_target.min() < 0 or draft_to_target.max() >= self.config.vocab_size:
            raise ValueError(f"draft_to_target ids must lie in [0, {self.config.vocab_size}).")
        self.d2t.copy_(draft_to_target)
        self.t2d.zero_()
        self.t2d[draft_to_target.to(self.t2d.device)] = True

    def map_logits_to_target_vocab(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocabulary logits into the target vocabulary; tokens outside the draft vocabulary get -inf."""
        shape = (*draft_logits.shape[:-1], self.config.vocab_size)
        target_logits = torch.full(shape, float("-inf"), dtype=draft_logits.dtype, device=draft_logits.device)
        target_logits[..., self.d2t.to(draft_logits.device)] = draft_logits
        return target_logits

    # ----- forward -----------------------------------------------------------------------------

    def _check_positions(self, last_position: int) -> None:
        limit = self.config.max_position_embeddings
        if last_position >= limit:
            raise ValueError(
                f"Sequence reaches position {last_position}, beyond the draft's max_position_embeddings={limit}. "
                "Shorten the prompt, or build the draft from a target config with a longer context."
            )

    def _position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor):
        """Return RoPE cos/sin for `position_ids`, looked up in a table when the RoPE type allows.

        Computing cos/sin costs several small operators per call, a visible share of a one-token
        draft step on CPU. Dynamic and long-context RoPE types rescale with the sequence length, so
        they are always computed directly, as is everything in training mode.
        """
        if self.training or self.rotary_emb.rope_type in ("dynamic", "longrope"):
            return self.rotary_emb(hidden_states, position_ids)
        needed = int(position_ids.max()) + 1
        table = self._rope_table
        if (
            table is None
            or table[0].shape[0] < needed
            or table[0].device != hidden_states.device
            or table[0].dtype != hidden_states.dtype
        ):
            # Grow by doubling so that a long generation rebuilds the table only a few times, and
            # never past the positions the draft supports.
            grown = 2 * table[0].shape[0] if table is not None else 256
            size = max(needed, min(grown, self.config.max_position_embeddings))
            all_positions = torch.arange(size, device=hidden_states.device)[None]
            cos, sin = self.rotary_emb(hidden_states, all_positions)
            table = self._rope_table = (cos[0], sin[0])
        cos, sin = table
        return cos[position_ids], sin[position_ids]

    def _decoder_stack(self, feature, inputs_embeds, position_ids, attention_mask, cache):
        hidden_states, attention_input = self.fusion(feature, inputs_embeds)
        position_embeddings = self._position_embeddings(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask, attention_input, cache)
            attention_input = None
        return hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        target_hidden_states: torch.Tensor | None = None,
        draft_hidden_states: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EdsdDraftCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> EdsdDraftOutput:
        r"""
        Run the draft on `sequence_length` positions.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                At position t, the token t+1 (the token the target produced from the features at t).
            target_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_length, k * hidden_size)`):
                The target's hidden states at the draft's `target_layer_ids`, concatenated in that order.
            draft_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`):
                The draft's own `last_hidden_state` from the previous position, used instead of
                `target_hidden_states` when drafting beyond the verified prefix.
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor`, *optional*): Defaults to positions after the cached ones.
            cache ([`EdsdDraftCache`], *optional*): Cache to read and extend; a new one is made when
                `use_cache=True` and none is given.
            logits_to_keep (`int`, *optional*, defaults to 0): Compute logits only for the last this many
                positions (0 keeps all). Drafting needs only the last one.
        """
        if (target_hidden_states is None) == (draft_hidden_states is None):
            raise ValueError("Pass exactly one of `target_hidden_states` and `draft_hidden_states`.")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}.")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` or `inputs_embeds`.")
            inputs_embeds = self.embed_tokens(input_ids)

        if target_hidden_states is not None:
            feature = self.fc(target_hidden_states.to(self.fc.weight.dtype))
        else:
            feature = draft_hidden_states.to(self.fc.weight.dtype)

        use_cache = use_cache if use_cache is not None else cache is not None
        if use_cache and cache is None:
            cache = EdsdDraftCache(self.config.num_hidden_layers)
        batch_size, query_length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)
            position_ids = position_ids[None].expand(batch_size, -1)
        self._check_positions(int(position_ids.max()))

        mask = build_causal_attention_mask(query_length, past_length, attention_mask, batch_size, inputs_embeds.device)
        hidden_states = self._decoder_stack(feature, inputs_embeds, position_ids, mask, cache)
        logits = self.lm_head(self.norm(hidden_states[:, -logits_to_keep:]))
        return EdsdDraftOutput(logits=logits, last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def forward_unrolled(
        self,
        target_hidden_states: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_steps: int = 1,
    ) -> list[torch.Tensor]:
        """Run the training-time-test unroll and return the draft-vocabulary logits of each step.

        Step 0 reads the target features at every position. Step i feeds each position the draft's
        step i-1 output from the previous position. The logits of step i at position t are therefore
        the draft's prediction for token t+2 after drafting i tokens from the verified prefix that
        ends at token t-i+1. All steps predict the same next tokens; the caller weights their losses.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, sequence_length = inputs_embeds.shape[:2]
        self._check_positions(sequence_length - 1)
        device = inputs_embeds.device
        position_ids = torch.arange(sequence_length, device=device)[None].expand(batch_size, -1)

        cache = EdsdDraftCache(self.config.num_hidden_layers)
        feature = self.fc(target_hidden_states.to(self.fc.weight.dtype))
        step_logits = []
        for step in range(num_steps):
            mask = build_unrolled_attention_mask(step, sequence_length, attention_mask, batch_size, device)
            hidden_states = self._decoder_stack(feature, inputs_embeds, position_ids, mask, cache)
            step_logits.append(self.lm_head(self.norm(hidden_states)))
            # Position t of the next step continues the chain from position t-1 of this one.
            feature = F.pad(hidden_states[:, :-1], (0, 0, 1, 0))
        return step_logits


__all__ = ["EdsdDraftModel", "EdsdPreTrainedModel", "EdsdDraftOutput"]
