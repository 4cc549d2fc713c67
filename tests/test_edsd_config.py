import pytest
from transformers import AutoConfig, GPT2Config, LlamaConfig

from edsd_hf import EdsdConfig
from edsd_hf.edsd import default_target_layer_ids

from tiny_models import FAMILIES, make_target


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_target_config_copies_target_fields(family):
    target = make_target(family)
    config = EdsdConfig.from_target_config(target.config, draft_vocab_size=40)

    assert config.hidden_size == target.config.hidden_size
    assert config.vocab_size == target.config.vocab_size
    assert config.draft_vocab_size == 40
    assert config.max_position_embeddings == target.config.max_position_embeddings
    assert config.rope_parameters == target.config.rope_parameters
    assert config.num_key_value_heads == target.config.num_key_value_heads
    assert config.target_model_type == family
    assert config.target_num_hidden_layers == target.config.num_hidden_layers
    assert config.target_layer_ids == default_target_layer_ids(target.config.num_hidden_layers)


def test_rope_scaling_copied_from_target():
    rope = {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0}
    target_config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, rope_parameters=rope)
    config = EdsdConfig.from_target_config(target_config)
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["rope_theta"] == 50000.0


def test_config_round_trip(tmp_path):
    target = make_target("qwen3")
    config = EdsdConfig.from_target_config(target.config, draft_vocab_size=32, fusion="concat")
    config.save_pretrained(tmp_path)

    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, EdsdConfig)
    reloaded_fields = {k: v for k, v in reloaded.to_dict().items() if k != "_name_or_path"}
    original_fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert reloaded_fields == original_fields


@pytest.mark.parametrize(
    ("num_layers", "fusion", "expected"),
    [
        (36, "edfuse", [23, 34]),
        (4, "edfuse", [1, 2]),
        (2, "edfuse", [0, 1]),
        (32, "concat", [2, 16, 29]),
        (4, "concat", [0, 2, 3]),
    ],
)
def test_default_target_layer_ids(num_layers, fusion, expected):
    assert default_target_layer_ids(num_layers, fusion) == expected


def test_explicit_layer_ids_override_default():
    target = make_target("llama")
    config = EdsdConfig.from_target_config(target.config, target_layer_ids=[0, 3])
    assert config.target_layer_ids == [0, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_layer_ids": [1, 7]}, r"\[7\] are out of range .* 4 decoder layers"),
        ({"target_layer_ids": [2, 2]}, "must be distinct"),
        ({"target_layer_ids": [1, 2, 3]}, "reads exactly 2 target layers"),
        ({"fusion": "concat", "target_layer_ids": [1, 2]}, "reads exactly 3 target layers"),
        ({"draft_vocab_size": 65}, "draft_vocab_size=65"),
        ({"fusion": "sum"}, "Unknown fusion 'sum'"),
    ],
)
def test_invalid_config_names_value(kwargs, message):
    target = make_target("llama")
    with pytest.raises(Exception, match=message):
        EdsdConfig.from_target_config(target.config, **kwargs)


def test_unsupported_target_family():
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        EdsdConfig.from_target_config(GPT2Config(n_layer=4))


def test_concat_needs_three_layers():
    with pytest.raises(ValueError, match="only 2 decoder layers"):
        default_target_layer_ids(2, "concat")
