"""Candidate generator that drafts with an EDSD draft inside transformers' assisted-decoding loop.

Per round of the loop:
1. The target's last verification pass (or the prefill) returns hidden states for the positions
   it processed. The first `n_matches + 1` of them lie on the accepted sequence.
2. The draft crops its cache back to the last target-fed position and reads those new features,
   which yields its prediction for the next token.
3. It drafts a chain, feeding its own hidden state back, and returns the chain with the draft's
   processed logits in the target vocabulary, so that speculative sampling uses exactly the
   distribution the draft sampled from.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StopStringCriteria
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.utils import logging

from .cache import EdsdDraftCache
from .modeling_edsd import DEFAULT_DRAFTING, EdsdDraftModel


logger = logging.get_logger(__name__)

DRAFT_LENGTH_SCHEDULES = ("constant", "heuristic", "heuristic_transient")


@dataclass
class SpeculationStats:
    """Counters of one `generate()` call, readable afterwards as `draft.speculation_stats`."""

    num_rounds: int = 0
    num_drafted: int = 0
    num_accepted: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification pass, counting the token the target itself contributes (tau)."""
        return (self.num_accepted + self.num_rounds) / self.num_rounds if self.num_rounds else 0.0


class EdsdCandidateGenerator(CandidateGenerator):
    """Drafts token chains with an [`EdsdDraftModel`] from the target's hidden states.

    The draft length is `num_assistant_tokens`, adapted by `num_assistant_tokens_schedule` like HF
    assistants, and cut early when the draft's probability of its own token falls below
    `assistant_confidence_threshold` (0 disables). The settings come from the draft's
    `generation_config`; a `generate()` argument overrides them when it differs from transformers'
    global default for that field.
    """

    requires_model_outputs = True

    def __init__(
        self,
        draft: EdsdDraftModel,
        target: PreTrainedModel,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None = None,
        tokenizer=None,
    ):
        batch_size, prompt_length = input_ids.shape
        if batch_size != 1:
            raise ValueError(
                f"EDSD speculative decoding supports batch size 1 (transformers verifies one sequence at a time); "
                f"got batch size {batch_size}. Call generate() once per prompt."
            )
        max_positions = draft.config.max_position_embeddings
        if prompt_length > max_positions:
            raise ValueError(
                f"Prompt has {prompt_length} tokens, longer than the draft's max_position_embeddings={max_positions}. "
                "Shorten the prompt or use a draft built for a longer context."
            )
        draft.attach_target(target)

        self.draft = draft
        # Read once: `PreTrainedModel.device` walks the parameters on every access, once per drafted token here.
        self.draft_device = draft.device
        self.target_layer_ids = list(draft.config.target_layer_ids)
        # Hidden state i + 1 is the output of decoder layer i (index 0 is the embedding output).
        self.model_kwargs_overrides = {"output_hidden_states": [i + 1 for i in self.target_layer_ids]}

        drafting = self._resolve_drafting_settings(draft.generation_config, generation_config)
        self.num_assistant_tokens = drafting["num_assistant_tokens"]
        self.num_assistant_tokens_schedule = drafting["num_assistant_tokens_schedule"]
        self.assistant_confidence_threshold = drafting["assistant_confidence_threshold"]

        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        # Draft logits are needed for speculative sampling (q), for processors that change the greedy
        # choice, and for ensemble verification.
        self.returns_logits = (
            self.do_sample
            or len(self.logits_processor) > 0
            or getattr(generation_config, "assistant_ensemble_weight", None) is not None
        )
        self.max_length = min(generation_config.max_length, max_positions)
        eos = generation_config.eos_token_id
        if eos is None:
            eos = []
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.stop_criteria = None
        if generation_config.stop_strings is not None and tokenizer is not None:
            self.stop_criteria = StopStringCriteria(tokenizer, generation_config.stop_strings)

        # Preallocated for the whole generation: appending in place avoids copying the cache per token.
        self.cache = EdsdDraftCache(draft.config.num_hidden_layers, capacity=self.max_length)
        # Draft cache positions computed from target features; later entries are speculative.
        self.num_target_fed_positions = 0
        self.stats = SpeculationStats()
        draft.speculation_stats = self.stats

    @staticmethod
    def _resolve_drafting_settings(draft_config: GenerationConfig | None, call_config: GenerationConfig) -> dict:
        settings = dict(DEFAULT_DRAFTING)
        for name in settings:
            value = getattr(draft_config, name, None) if draft_config is not None else None
            if value is not None:
                settings[name] = value

        # generate() fills unset fields of the call's config with transformers' global defaults, so a
        # call value counts as the user's choice only when it differs from that default.
        global_defaults = GenerationConfig._get_default_generation_params()
        for name in settings:
            value = getattr(call_config, name, None)
            if value is not None and value != global_defaults.get(name):
                settings[name] = value

        if int(settings["num_assistant_tokens"]) < 1:
            raise ValueError(f"num_assistant_tokens must be at least 1, got {settings['num_assistant_tokens']}.")
        if settings["num_assistant_tokens_schedule"] not in DRAFT_LENGTH_SCHEDULES:
            raise ValueError(
                f"num_assistant_tokens_schedule={settings['num_assistant_tokens_schedule']!r} is not supported; "
                f"use one of {DRAFT_LENGTH_SCHEDULES}."
            )
        if not 0.0 <= float(settings["assistant_confidence_threshold"]) < 1.0:
            raise ValueError(
                f"assistant_confidence_threshold must lie in [0, 1), got {settings['assistant_confidence_threshold']}."
            )
        settings["num_assistant_tokens"] = int(settings["num_assistant_tokens"])
        return settings

    @property
    def num_drafting_tokens(self) -> int:
        return self.num_assistant_tokens

    # ----- the loop's interface ----------------------------------------------------------------

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        # The first call comes before the target's prefill, so there are no features yet: return no
        # candidates and let the target process the prompt alone.
        if is_first_iteration:
            return input_ids, None

        current_length = input_ids.shape[1]
        max_new_tokens = min(self.num_assistant_tokens, self.max_length - current_length - 1)
        if max_new_tokens <= 0:
            return input_ids, None
        if model_outputs is None or getattr(model_outputs, "hidden_states", None) is None:
            raise ValueError(
                "The target's forward pass returned no hidden states, which the EDSD draft needs. The target must "
                "honour `output_hidden_states` (supported families: see EdsdConfig.from_target_config)."
            )

        hidden_states, logits = self._read_target_features(input_ids, model_outputs.hidden_states)
        candidate_ids, candidate_logits = self._draft_chain(input_ids, hidden_states, logits, max_new_tokens)
        if candidate_ids.shape[1] == current_length:
            return input_ids, None

        self.stats.num_rounds += 1
        self.stats.num_drafted += candidate_ids.shape[1] - current_length
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        num_candidates = scores.shape[1] - 1
        if num_candidates > 0:
            self.stats.num_accepted += int(num_matches)
        if self.num_assistant_tokens_schedule in ("heuristic", "heuristic_transient") and num_candidates > 0:
            if num_matches == num_candidates:
                self.num_assistant_tokens += 2
            else:
                self.num_assistant_tokens = max(1, self.num_assistant_tokens - 1)
        if self.num_assistant_tokens_schedule == "heuristic":
            # Like HF assistants, the plain heuristic schedule carries the adapted length to the next call.
            self.draft.generation_config.num_assistant_tokens = self.num_assistant_tokens

    # ----- drafting ----------------------------------------------------------------------------

    def _read_target_features(self, input_ids: torch.LongTensor, target_hidden_states: tuple):
        """Feed the draft the newly verified positions and return its last hidden state and logits."""
        current_length = input_ids.shape[1]
        # Positions num_target_fed_positions .. current_length - 2 now have verified features; each is
        # paired with the token that follows it.
        num_new = current_length - 1 - self.num_target_fed_positions
        features = torch.cat(
            [target_hidden_states[i + 1][:, :num_new] for i in self.target_layer_ids], dim=-1
        ).to(self.draft_device)
        next_tokens = input_ids[:, self.num_target_fed_positions + 1 : current_length].to(self.draft_device)
        position_ids = torch.arange(self.num_target_fed_positions, current_length - 1, device=self.draft_device)

        self.cache.crop(self.num_target_fed_positions)
        output = self.draft(
            input_ids=next_tokens,
            target_hidden_states=features,
            position_ids=position_ids[None],
            cache=self.cache,
            logits_to_keep=1,
        )
        self.num_target_fed_positions = current_length - 1
        return output.last_hidden_state[:, -1:], output.logits[:, -1]

    def _select_token(self, candidate_ids, draft_logits):
        """Pick the next draft token; return it, its processed target-vocabulary logits and its probability.

        Greedy drafting without logits processors takes the argmax in the draft vocabulary and
        returns no logits, because the loop then compares tokens only and the scatter into the
        target vocabulary would be wasted work.
        """
        if not self.returns_logits:
            draft_token = draft_logits.argmax(dim=-1, keepdim=True)
            token = self.draft.d2t[draft_token].to(candidate_ids.device)
            confidence = 1.0
            if self.assistant_confidence_threshold > 0:
                confidence = float(torch.softmax(draft_logits.float(), dim=-1).gather(-1, draft_token))
            return token, None, confidence

        logits = self.draft.map_logits_to_target_vocab(draft_logits.float()).to(candidate_ids.device)
        if len(self.logits_processor) > 0:
            logits = self.logits_processor(candidate_ids, logits)
        probs = torch.softmax(logits, dim=-1)
        if self.do_sample:
            token = torch.multinomial(probs, num_samples=1)
        else:
            token = logits.argmax(dim=-1, keepdim=True)
        return token, logits, float(probs.gather(-1, token))

    def _draft_chain(self, input_ids, hidden_state, draft_logits, max_new_tokens):
        candidate_ids = input_ids
        candidate_logits = []
        for step in range(max_new_tokens):
            token, logits, confidence = self._select_token(candidate_ids, draft_logits)
            extended_ids = torch.cat([candidate_ids, token], dim=-1)

            # A draft token that completes a stop string is left for the target to produce, so that
            # generation stops at the same token as plain decoding (the loop checks stop strings
            # only at the end of the accepted tokens).
            if self.stop_criteria is not None and bool(self.stop_criteria(extended_ids, None).any()):
                break
            candidate_ids = extended_ids
            candidate_logits.append(logits)

            is_last = step == max_new_tokens - 1
            is_eos = int(token) in self.eos_token_ids
            if is_last or is_eos or confidence < self.assistant_confidence_threshold:
                break

            position = input_ids.shape[1] - 1 + step
            output = self.draft(
                input_ids=token.to(self.draft_device),
                draft_hidden_states=hidden_state,
                position_ids=torch.tensor([[position]], device=self.draft_device),
                cache=self.cache,
            )
            hidden_state, draft_logits = output.last_hidden_state, output.logits[:, -1]

        if not candidate_logits or not self.returns_logits:
            return candidate_ids, None
        return candidate_ids, torch.stack(candidate_logits, dim=1)
