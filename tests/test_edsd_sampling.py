"""Speculative sampling with an EDSD draft must reproduce the target's sampling distribution."""

from unittest import mock

import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edsd_hf.edsd import EdsdCandidateGenerator

from tiny_models import make_draft, make_target


NUM_SAMPLES = 1500
PROMPT = torch.tensor([[3, 17, 42, 8, 25]])


def peaky_pair():
    """Target and draft with concentrated, different next-token distributions, so that both
    acceptance and rejection (residual sampling) happen often."""
    target = make_target("llama", seed=3)
    draft = make_draft(target, seed=4)
    with torch.no_grad():
        target.lm_head.weight.mul_(25.0)
        draft.lm_head.weight.mul_(60.0)
    draft.generation_config.num_assistant_tokens = 2
    return target, draft


def exact_two_token_distribution(target, warpers: LogitsProcessorList) -> dict[tuple[int, int], float]:
    """P(x1, x2 | PROMPT) of plain sampling, computed from the target's processed logits."""
    with torch.no_grad():
        first_logits = warpers(PROMPT, target(PROMPT).logits[:, -1].float())
        first = first_logits.softmax(-1)[0]
        distribution = {}
        for x1 in first.nonzero().flatten().tolist():
            context = torch.cat([PROMPT, torch.tensor([[x1]])], dim=-1)
            second = warpers(context, target(context).logits[:, -1].float()).softmax(-1)[0]
            for x2 in second.nonzero().flatten().tolist():
                distribution[(x1, x2)] = float(first[x1] * second[x2])
    return distribution


def sample_counts(target, draft, generation_kwargs) -> dict[tuple[int, int], int]:
    counts = {}
    for _ in range(NUM_SAMPLES):
        output = target.generate(PROMPT, max_new_tokens=2, do_sample=True, assistant_model=draft, **generation_kwargs)
        pair = tuple(output[0, -2:].tolist())
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def chi_square_p_value(counts, distribution) -> float:
    """Pearson test of sampled pairs against the exact distribution, pooling cells expected below 5."""
    unexpected = sum(count for pair, count in counts.items() if pair not in distribution)
    if unexpected:
        return 0.0
    observed, expected = [], []
    pooled_observed, pooled_expected = 0, 0.0
    for pair, probability in distribution.items():
        if probability * NUM_SAMPLES >= 5:
            observed.append(counts.get(pair, 0))
            expected.append(probability * NUM_SAMPLES)
        else:
            pooled_observed += counts.get(pair, 0)
            pooled_expected += probability * NUM_SAMPLES
    observed.append(pooled_observed)
    expected.append(pooled_expected)
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


SETTINGS = [
    ({"temperature": 0.7, "top_k": 4}, [TemperatureLogitsWarper(0.7), TopKLogitsWarper(4)]),
    ({"temperature": 1.3, "top_k": 6, "top_p": 0.8}, [TemperatureLogitsWarper(1.3), TopKLogitsWarper(6), TopPLogitsWarper(0.8)]),
]


@pytest.mark.parametrize(("generation_kwargs", "warpers"), SETTINGS)
def test_sampling_matches_target_distribution(generation_kwargs, warpers):
    target, draft = peaky_pair()
    distribution = exact_two_token_distribution(target, LogitsProcessorList(warpers))
    torch.manual_seed(1234)
    counts = sample_counts(target, draft, generation_kwargs)

    assert draft.speculation_stats.num_drafted > 0
    assert chi_square_p_value(counts, distribution) > 1e-3


def test_sampling_test_detects_unprocessed_draft_logits():
    """Negative control: returning q before temperature while sampling after it must be caught."""
    target, draft = peaky_pair()
    generation_kwargs, warpers = {"temperature": 0.5, "top_k": 4}, [TemperatureLogitsWarper(0.5), TopKLogitsWarper(4)]
    distribution = exact_two_token_distribution(target, LogitsProcessorList(warpers))
    correct_chain = EdsdCandidateGenerator._draft_chain

    def chain_with_unscaled_logits(self, *args):
        candidate_ids, candidate_logits = correct_chain(self, *args)
        if candidate_logits is not None:
            candidate_logits = candidate_logits * generation_kwargs["temperature"]
        return candidate_ids, candidate_logits

    torch.manual_seed(1234)
    with mock.patch.object(EdsdCandidateGenerator, "_draft_chain", chain_with_unscaled_logits):
        counts = sample_counts(target, draft, generation_kwargs)
    assert chi_square_p_value(counts, distribution) < 1e-4
