import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from edsd_hf import EdsdDraftModel
from edsd_hf.edsd import EdsdDraftCache

from tiny_models import make_draft, make_target


def replay_inference(draft, features, input_ids, anchor, num_speculative_steps):
    """Draft logits after feeding target features up to `anchor`, then drafting speculatively."""
    cache = EdsdDraftCache(draft.config.num_hidden_layers)
    output = draft(input_ids=input_ids[:, : anchor + 1], target_hidden_states=features[:, : anchor + 1], cache=cache)
    hidden_state, logits = output.last_hidden_state[:, -1:], output.logits[:, -1]
    for step in range(1, num_speculative_steps + 1):
        position = anchor + step
        output = draft(
            input_ids=input_ids[:, position : position + 1], draft_hidden_states=hidden_state, cache=cache
        )
        hidden_state, logits = output.last_hidden_state, output.logits[:, -1]
    return logits


@pytest.mark.parametrize("fusion", ["edfuse", "concat"])
def test_unrolled_forward_matches_inference_drafting(fusion):
    target = make_target("llama")
    draft = make_draft(target, draft_vocab_size=48, fusion=fusion)
    draft.attach_target(target)
    sequence = torch.randint(0, 64, (1, 13))
    layer_ids = [i + 1 for i in draft.config.target_layer_ids]
    with torch.no_grad():
        hidden_states = target(sequence[:, :-1], output_hidden_states=layer_ids).hidden_states
        features = torch.cat([hidden_states[i] for i in layer_ids], dim=-1)
        draft_inputs = sequence[:, 1:]
        unrolled = draft.forward_unrolled(features, input_ids=draft_inputs, num_steps=4)

        for step in range(4):
            for position in range(step, draft_inputs.shape[1]):
                expected = replay_inference(draft, features, draft_inputs, position - step, step)
                torch.testing.assert_close(unrolled[step][:, position], expected, rtol=1e-5, atol=1e-5)


def test_unrolled_forward_with_padding_is_finite():
    target = make_target("llama")
    draft = make_draft(target)
    draft.attach_target(target)
    features = torch.randn(2, 10, draft.config.target_feature_size)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    logits = draft.forward_unrolled(features, input_ids=torch.randint(0, 64, (2, 10)), attention_mask=mask, num_steps=3)
    assert all(torch.isfinite(step).all() for step in logits)


def test_save_load_round_trip_is_exact(tmp_path):
    target = make_target("qwen3")
    draft = make_draft(target, draft_vocab_size=40)
    draft.set_draft_vocab(torch.randperm(64)[:40])
    draft.generation_config.num_assistant_tokens = 9
    draft.save_pretrained(tmp_path)

    assert (tmp_path / "model.safetensors").exists()
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(draft.state_dict()), "the checkpoint holds exactly the draft's own tensors"
    assert not any("embed_tokens" in name for name in saved), "target embeddings were saved"

    for loader in (EdsdDraftModel, AutoModel):
        reloaded = loader.from_pretrained(tmp_path)
        assert isinstance(reloaded, EdsdDraftModel)
        assert reloaded.state_dict().keys() == draft.state_dict().keys()
        for name, tensor in draft.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
        assert reloaded.generation_config.num_assistant_tokens == 9


def test_draft_vocab_mapping():
    target = make_target("llama")
    draft = make_draft(target, draft_vocab_size=4)
    draft.set_draft_vocab(torch.tensor([5, 9, 2, 60]))
    assert draft.t2d.sum() == 4
    assert draft.t2d[[5, 9, 2, 60]].all()

    mapped = draft.map_logits_to_target_vocab(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert mapped.shape == (1, 64)
    assert mapped[0, 60] == 4.0
    assert mapped[0, 2] == 3.0
    assert torch.isinf(mapped[0, 0])


@pytest.mark.parametrize(
    ("mapping", "message"),
    [([1, 1, 2, 3], "duplicate"), ([1, 2, 3], r"shape \(4,\)"), ([1, 2, 3, 64], r"\[0, 64\)")],
)
def test_set_draft_vocab_rejects_bad_mapping(mapping, message):
    target = make_target("llama")
    draft = make_draft(target, draft_vocab_size=4)
    with pytest.raises(ValueError, match=message):
        draft.set_draft_vocab(torch.tensor(mapping))


def test_draft_without_target_embeddings_raises():
    draft = make_draft(make_target("llama"))
    features = torch.randn(1, 3, draft.config.target_feature_size)
    with pytest.raises(ValueError, match="attach_target"):
        draft(input_ids=torch.tensor([[1, 2, 3]]), target_hidden_states=features)


def test_draft_generate_points_to_target():
    draft = make_draft(make_target("llama"))
    with pytest.raises(TypeError, match="assistant_model=draft"):
        draft.generate(torch.tensor([[1, 2]]))


def test_positions_beyond_limit_raise():
    target = make_target("llama")
    draft = make_draft(target, max_position_embeddings=8)
    draft.attach_target(target)
    features = torch.randn(1, 9, draft.config.target_feature_size)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        draft(input_ids=torch.randint(0, 64, (1, 9)), target_hidden_states=features)


def test_preallocated_cache_matches_concatenating_cache():
    torch.manual_seed(0)
    growing, preallocated = EdsdDraftCache(1), EdsdDraftCache(1, capacity=3)
    chunks = [torch.randn(1, 2, length, 4) for length in (2, 1, 4)]
    for chunk in chunks:
        expected = growing.update(chunk, -chunk, 0)
        # Capacity 3 forces the buffer to grow on the third append.
        actual = preallocated.update(chunk, -chunk, 0)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    growing.crop(4)
    preallocated.crop(4)
    assert preallocated.get_seq_length() == growing.get_seq_length() == 4
    replacement = torch.randn(1, 2, 2, 4)
    torch.testing.assert_close(preallocated.update(replacement, replacement, 0), growing.update(replacement, replacement, 0))
    with pytest.raises(ValueError, match="capacity"):
        EdsdDraftCache(1, capacity=0)


@pytest.mark.parametrize("fusion", ["edfuse", "concat"])
def test_drafting_with_preallocated_cache_matches_concatenating_cache(fusion):
    target = make_target("llama")
    draft = make_draft(target, fusion=fusion)
    draft.attach_target(target)
    tokens = torch.randint(0, 64, (1, 12))
    features = torch.randn(1, 12, draft.config.target_feature_size)
    results = []
    for cache in (EdsdDraftCache(draft.config.num_hidden_layers), EdsdDraftCache(draft.config.num_hidden_layers, capacity=5)):
        with torch.no_grad():
            first = draft(input_ids=tokens[:, :8], target_hidden_states=features[:, :8], cache=cache)
            cache.crop(6)
            second = draft(input_ids=tokens[:, 6:9], target_hidden_states=features[:, 6:9], cache=cache)
            step = draft(input_ids=tokens[:, 9:10], draft_hidden_states=second.last_hidden_state[:, -1:], cache=cache)
        results.append((first.logits, second.logits, step.logits))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rope_table_matches_direct_rope():
    target = make_target("llama", max_position_embeddings=1024)
    draft = make_draft(target)
    hidden = torch.zeros(1, 1, draft.config.hidden_size)
    for positions in (torch.tensor([[3, 4, 5]]), torch.tensor([[700]]), torch.arange(1024)[None]):
        cos, sin = draft._position_embeddings(hidden, positions)
        expected_cos, expected_sin = draft.rotary_emb(hidden, positions)
        torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)
    assert draft._rope_table[0].shape[0] == 1024


def test_logits_to_keep_returns_the_last_positions():
    target = make_target("llama")
    draft = make_draft(target)
    draft.attach_target(target)
    tokens = torch.randint(0, 64, (1, 7))
    features = torch.randn(1, 7, draft.config.target_feature_size)
    with torch.no_grad():
        full = draft(input_ids=tokens, target_hidden_states=features).logits
        last = draft(input_ids=tokens, target_hidden_states=features, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        draft(input_ids=tokens, target_hidden_states=features, logits_to_keep=-1)
