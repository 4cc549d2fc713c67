"""Speculative sampling with an EDSD draft must reproduce the target's sampling distribution."""

from unittest import mock

import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edsd_hf.edsd import EdsdCandidateGenerator

from tiny_models import make_draft, make_target


NUM_SAMPLES = 1000
# The target's prefill gives the first token. The draft proposes the second, which is accepted or
# replaced by residual sampling. The third is the target's bonus token after an acceptance.
NUM_TOKENS = 3
PROMPT = torch.tensor([[3, 17, 42, 8, 25]])


def peaky_pair():
    """Target and draft with sharpened, different next-token distributions, so that both
    acceptance and rejection (residual sampling) happen often."""
    target = make_target("llama", seed=3)
    draft = make_draft(target, seed=4)
    with torch.no_grad():
        target.lm_head.weight.mul_(2.0)
        draft.lm_head.weight.mul_(5.0)
    draft.generation_config.num_assistant_tokens = 2
    return target, draft


def exact_distribution(target, warpers: LogitsProcessorList, num_tokens: int) -> dict[tuple, float]:
    """P(x1..xn | PROMPT) of plain sampling, computed from the target's processed logits."""
    distribution = {(): 1.0}
    with torch.no_grad():
        for _ in range(num_tokens):
            extended = {}
            for prefix, prefix_probability in distribution.items():
                context = torch.cat([PROMPT, torch.tensor([list(prefix)], dtype=torch.long)], dim=-1)
                probabilities = warpers(context, target(context).logits[:, -1].float()).softmax(-1)[0]
                for token in probabilities.nonzero().flatten().tolist():
                    extended[prefix + (token,)] = prefix_probability * float(probabilities[token])
            distribution = extended
    return distribution


def sample_counts(target, draft, generation_kwargs) -> dict[tuple, int]:
    counts = {}
    for _ in range(NUM_SAMPLES):
        output = target.generate(
            PROMPT, max_new_tokens=NUM_TOKENS, do_sample=True, assistant_model=draft, **generation_kwargs
        )
        sequence = tuple(output[0, PROMPT.shape[1] :].tolist())
        counts[sequence] = counts.get(sequence, 0) + 1
    return counts


def chi_square_p_value(counts, distribution) -> float:
    """Pearson test of sampled sequences against the exact distribution.

    Cells expected fewer than 5 times are pooled, and a pool still under 5 absorbs the smallest
    remaining cell, so that every tested cell is expected at least 5 times.
    """
    unexpected = sum(count for sequence, count in counts.items() if sequence not in distribution)
    if unexpected:
        return 0.0
    total = sum(counts.values())
    cells = sorted(((probability * total, counts.get(sequence, 0)) for sequence, probability in distribution.items()))
    pooled_expected, pooled_observed = 0.0, 0
    while cells and cells[0][0] < 5:
        expected, observed = cells.pop(0)
        pooled_expected += expected
        pooled_observed += observed
    if 0 < pooled_expected < 5 and cells:
        expected, observed = cells.pop(0)
        pooled_expected += expected
        pooled_observed += observed
    if pooled_expected > 0:
        cells.append((pooled_expected, pooled_observed))
    expected_counts = [expected for expected, _ in cells]
    observed_counts = [observed for _, observed in cells]
    scale = sum(observed_counts) / sum(expected_counts)
    return float(chisquare(observed_counts, [e * scale for e in expected_counts]).pvalue)


SETTINGS = [
    ({"temperature": 0.5, "top_k": 4}, [TemperatureLogitsWarper(0.5), TopKLogitsWarper(4)]),
    ({"temperature": 1.3, "top_k": 5, "top_p": 0.8}, [TemperatureLogitsWarper(1.3), TopKLogitsWarper(5), TopPLogitsWarper(0.8)]),
]


@pytest.mark.parametrize(("generation_kwargs", "warpers"), SETTINGS)
def test_sampling_matches_target_distribution(generation_kwargs, warpers):
    target, draft = peaky_pair()
    distribution = exact_distribution(target, LogitsProcessorList(warpers), NUM_TOKENS)
    torch.manual_seed(1234)
    counts = sample_counts(target, draft, generation_kwargs)

    assert draft.speculation_stats.num_drafted == 1, "each call drafts one token (verified with the bonus token)"
    assert chi_square_p_value(counts, distribution) > 1e-3


def marginal_of_first_tokens(table: dict[tuple, float], num_tokens: int) -> dict[tuple, float]:
    marginal = {}
    for sequence, value in table.items():
        marginal[sequence[:num_tokens]] = marginal.get(sequence[:num_tokens], 0) + value
    return marginal


def test_sampling_test_detects_unprocessed_draft_logits():
    """Negative control: returning q from the unprocessed draft logits while sampling from the
    processed ones (a known bug class) must fail the same test. The drafted token is the second
    one, so the check runs on the first two tokens, where the bias is (total variation about 0.15)."""
    target, draft = peaky_pair()
    generation_kwargs, warpers = SETTINGS[0]
    distribution = marginal_of_first_tokens(exact_distribution(target, LogitsProcessorList(warpers), NUM_TOKENS), 2)
    correct_select = EdsdCandidateGenerator._select_token

    def select_with_unprocessed_q(self, candidate_ids, draft_logits):
        token, _, confidence = correct_select(self, candidate_ids, draft_logits)
        unprocessed = self.draft.map_logits_to_target_vocab(draft_logits.float())
        return token, unprocessed, confidence

    torch.manual_seed(1234)
    with mock.patch.object(EdsdCandidateGenerator, "_select_token", select_with_unprocessed_q):
        counts = marginal_of_first_tokens(sample_counts(target, draft, generation_kwargs), 2)
    assert chi_square_p_value(counts, distribution) < 1e-4
