"""HookMoE on tiny MoE models built offline from the real Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE configs."""

import json
import os

import datasets
import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    TrainingArguments,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from edsd_hf import HookMoEConfig, HookMoEForCausalLM, HookMoETrainer
from edsd_hf.cli import main as cli_main
from edsd_hf.hookmoe import build_calibration_dataset, resolve_top_k_schedule
from edsd_hf.hookmoe.cli import format_schedule, parse_top_k
from edsd_hf.hookmoe.evaluation import evaluate_hookmoe, evaluate_language_modeling
from edsd_hf.hookmoe.modeling_hookmoe import find_routers, load_balancing_loss_per_layer
from edsd_hf.hookmoe.sensitivity import depth_trend, layer_sensitivity, plot_sensitivity, propose_schedule
from edsd_hf.hookmoe.trainer import parse_loss_weights


VOCAB_SIZE = 64
NUM_LAYERS = 4
NUM_EXPERTS = 4

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    # A wider initialisation than the default makes the tiny models' outputs depend visibly on routing.
    initializer_range=0.2,
)

# Qwen2-MoE is built with a dense layer (mlp_only_layers) to cover layers without a router.
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=NUM_EXPERTS),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON,
        num_experts=NUM_EXPERTS,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON, num_experts=NUM_EXPERTS, moe_intermediate_size=24, head_dim=8, norm_topk_prob=True
    ),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=NUM_EXPERTS),
}


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer with one token per character of a 63-character alphabet, plus an EOS token."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n"[: VOCAB_SIZE - 1]
    vocab = {character: index for index, character in enumerate(alphabet)}
    vocab["<eos>"] = VOCAB_SIZE - 1
    backend = Tokenizer(WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n" * 3,
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n" * 3,
    "for index in range(10):\n    total = total + index\n" * 3,
    "import os\npath = os.path.join(root, name)\n" * 3,
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run these tiny models on one thread, because thread start-up costs more than it saves at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Save one tiny base per family, with a tokenizer, and return the directories."""
    dirs = {}
    for family, make_config in FAMILIES.items():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(make_config())
        path = tmp_path_factory.mktemp(family)
        base.save_pretrained(path)
        make_char_tokenizer().save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def random_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_hooks(model: HookMoEForCausalLM, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.hooks.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("family", list(FAMILIES))
def test_schedule_sets_router_width(base_dirs, family):
    model = HookMoEForCausalLM.from_base(base_dirs[family], top_k="upper half k=1", hook_layers=[2])
    widths = {}

    def record(layer_idx, module, args, output):
        widths[layer_idx] = output[2].shape[-1]

    handles = [
        router.register_forward_hook(lambda m, a, o, i=i: record(i, m, a, o))
        for i, router in find_routers(model.model).items()
    ]
    logits(model, random_ids())
    for handle in handles:
        handle.remove()

    expected = {i: k for i, k in enumerate(model.config.top_k_per_layer) if k is not None}
    assert widths == expected
    assert expected[NUM_LAYERS - 1] == 1
    assert expected[0] == 2


def test_schedule_lists_and_rules():
    moe_layers = [0, 2, 3]
    assert resolve_top_k_schedule(None, 4, moe_layers, 2, 4) == [2, None, 2, 2]
    assert resolve_top_k_schedule(1, 4, moe_layers, 2, 4) == [1, None, 1, 1]
    assert resolve_top_k_schedule([1, None, 3, None], 4, moe_layers, 2, 4) == [1, None, 3, 2]
    assert resolve_top_k_schedule("upper half k=1", 4, moe_layers, 2, 4) == [2, None, 1, 1]
    assert resolve_top_k_schedule("all k=3; layer 3 k=1", 4, moe_layers, 2, 4) == [3, None, 3, 1]
    assert resolve_top_k_schedule("lower 1 k=1; layers 2-3 k=4", 4, moe_layers, 2, 4) == [1, None, 4, 4]
    # The middle layer of an odd-depth model belongs to neither half.
    assert resolve_top_k_schedule("upper half k=1", 5, [0, 1, 2, 3, 4], 2, 4) == [2, 2, 2, 1, 1]


def test_active_experts_reduction(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k=1)
    assert model.config.active_experts_per_token == 1.0
    assert model.config.active_experts_reduction == 0.5
    with model.disable_hookmoe():
        assert model.active_experts_per_token == 2.0
    assert model.active_experts_per_token == 1.0


def test_norm_topk_prob_override(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, norm_topk_prob=True)
    routers = find_routers(model.model)
    assert all(router.norm_topk_prob for router in routers.values())
    with model.disable_hookmoe():
        assert not any(router.norm_topk_prob for router in routers.values())
    assert all(router.norm_topk_prob for router in routers.values())


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_untrained_hook_is_identity(base_dirs, family):
    model = HookMoEForCausalLM.from_base(base_dirs[family], top_k=1, hook_layers=[0, 2])
    input_ids = random_ids()
    hooked = logits(model, input_ids)
    with model.disable_hooks():
        reduced = logits(model, input_ids)
    with model.disable_hookmoe():
        full = logits(model, input_ids)
    assert torch.equal(hooked, reduced)
    assert not torch.allclose(reduced, full)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_disable_hookmoe_matches_base(base_dirs, family):
    base = AutoModelForCausalLM.from_pretrained(base_dirs[family])
    input_ids = random_ids()
    expected = logits(base, input_ids)
    model = HookMoEForCausalLM.from_base(base, top_k=1, hook_layers=[1])
    randomize_hooks(model)
    with model.disable_hookmoe():
        torch.testing.assert_close(logits(model, input_ids), expected)
    assert not torch.allclose(logits(model, input_ids), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_uncached_greedy(base_dirs, family):
    model = HookMoEForCausalLM.from_base(base_dirs[family], top_k="upper half k=1", hook_layers=[1, 3])
    randomize_hooks(model)
    prompt = random_ids(batch=1, length=5)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)

    # Greedy decoding by full forwards without a cache. Equal tokens show that the hooks and the
    # reduced routers leave KV-cache indexing intact.
    expected = prompt
    for _ in range(6):
        next_token = logits(model, expected)[:, -1].argmax(dim=-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=-1)
    assert torch.equal(generated, expected)


def test_output_router_logits_aux_loss(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k="upper half k=1")
    input_ids = random_ids()
    outputs = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    assert len(outputs.router_logits) == NUM_LAYERS

    expected_aux = load_balancing_loss_per_layer(outputs.router_logits, NUM_EXPERTS, [2, 2, 1, 1])
    torch.testing.assert_close(outputs.aux_loss, expected_aux)
    plain = model(input_ids=input_ids, labels=input_ids)
    coefficient = model.model.router_aux_loss_coef
    torch.testing.assert_close(outputs.loss, plain.loss + coefficient * expected_aux)

    # At the original k the per-layer loss equals the loss transformers computes with the global k.
    with model.disable_hookmoe():
        full = model(input_ids=input_ids, output_router_logits=True)
    reference = load_balancing_loss_func(full.router_logits, NUM_EXPERTS, 2)
    torch.testing.assert_close(full.aux_loss, reference)
    torch.testing.assert_close(load_balancing_loss_per_layer(full.router_logits, NUM_EXPERTS, [2] * 4), reference)


def test_gradient_checkpointing_trains_hooks(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["qwen3_moe"], top_k=1, hook_layers=[2])
    model.gradient_checkpointing_enable()
    model.train()
    input_ids = random_ids()
    model(input_ids=input_ids, labels=input_ids).loss.backward()

    assert model.hooks["2"].up_proj.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.model.parameters())


# ---------------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_save_load_round_trip(base_dirs, tmp_path, family):
    model = HookMoEForCausalLM.from_base(base_dirs[family], top_k="upper half k=1", hook_layers=[0, 3], hook_rank=8)
    randomize_hooks(model)
    input_ids = random_ids()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.hook_state_dict())
    assert all(key.startswith("hooks.") for key in saved)
    with open(tmp_path / "config.json") as file:
        saved_config = json.load(file)
    assert saved_config["model_type"] == "hookmoe"
    assert saved_config["base_model_name_or_path"] == base_dirs[family]

    reloaded = HookMoEForCausalLM.from_pretrained(tmp_path)
    assert reloaded.top_k_per_layer == model.top_k_per_layer
    assert torch.equal(logits(reloaded, input_ids), expected)

    auto_loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto_loaded, HookMoEForCausalLM)
    assert torch.equal(logits(auto_loaded, input_ids), expected)


def test_auto_classes_registered():
    config = AutoConfig.for_model("hookmoe", text_config=FAMILIES["olmoe"]().to_dict(), top_k_schedule=1)
    assert isinstance(config, HookMoEConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, HookMoEForCausalLM)
    assert model.top_k_per_layer == [1, 1, 1, 1]


def test_unload_restores_base(base_dirs):
    base = AutoModelForCausalLM.from_pretrained(base_dirs["mixtral"])
    input_ids = random_ids()
    expected = logits(base, input_ids)
    model = HookMoEForCausalLM.from_base(base, top_k=1, hook_layers=[1])
    randomize_hooks(model)
    with pytest.raises(ValueError, match="already wrapped by a HookMoEForCausalLM"):
        HookMoEForCausalLM.from_base(base, top_k=1)

    unloaded = model.unload()
    assert unloaded is base
    assert torch.equal(logits(base, input_ids), expected)
    rewrapped = HookMoEForCausalLM.from_base(base, top_k=1)
    assert rewrapped.top_k_per_layer == [1, 1, 1, 1]


def test_from_pretrained_onto_given_base(base_dirs, tmp_path):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[1])
    randomize_hooks(model)
    model.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_dirs["olmoe"])
    reloaded = HookMoEForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert reloaded.model is base
    assert torch.equal(logits(reloaded, random_ids()), logits(model, random_ids()))


# ---------------------------------------------------------------------------------------------- errors


def test_dense_base_rejected(tmp_path):
    LlamaConfig(**{key: value for key, value in COMMON.items() if key != "num_experts_per_tok"}).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'llama' is not a Mixture-of-Experts model"):
        HookMoEForCausalLM.from_base(str(tmp_path), top_k=1)


@pytest.mark.parametrize("top_k", [0, NUM_EXPERTS + 1, [2, 2, 0, 2], "upper half k=5"])
def test_invalid_k_rejected(base_dirs, top_k):
    with pytest.raises(ValueError, match=r"Invalid top_k=(0|5) for decoder layer \d"):
        HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k=top_k)


@pytest.mark.parametrize(
    ("top_k", "message"),
    [
        ([1, 1], "top_k list has 2 entries, but the base has 4 decoder layers"),
        ("middle k=1", "unknown layer selector 'middle'"),
        ("upper half", "does not end in 'k=<int>'"),
        ("layers 2-9 k=1", "out of range"),
    ],
)
def test_invalid_schedule_rejected(base_dirs, top_k, message):
    with pytest.raises(ValueError, match=message):
        HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k=top_k)


@pytest.mark.parametrize("hook_layers", [[NUM_LAYERS], [-1]])
def test_hook_layer_out_of_range_rejected(base_dirs, hook_layers):
    with pytest.raises(ValueError, match=rf"hook_layers \[{hook_layers[0]}\] are out of range"):
        HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k=1, hook_layers=hook_layers)


def test_mixtral_without_renormalisation_rejected(base_dirs):
    with pytest.raises(ValueError, match="norm_topk_prob=False is not possible on a Mixtral base"):
        HookMoEForCausalLM.from_base(base_dirs["mixtral"], top_k=1, norm_topk_prob=False)


def test_hooks_for_another_base_rejected(base_dirs, tmp_path):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[1])
    model.save_pretrained(tmp_path)
    wider = AutoModelForCausalLM.from_config(OlmoeConfig(**{**COMMON, "hidden_size": 48}, num_experts=NUM_EXPERTS))
    with pytest.raises(ValueError, match=r"saved for another base .*hidden_size: saved for 32, base has 48"):
        HookMoEForCausalLM.from_pretrained(tmp_path, base_model=wider)
    with pytest.raises(ValueError, match=r"model_type: saved for 'olmoe', base has 'mixtral'"):
        HookMoEForCausalLM.from_pretrained(tmp_path, base_model=base_dirs["mixtral"])


def test_hook_weights_mismatch_rejected(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[1], hook_rank=8)
    other_layer = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[2], hook_rank=8)
    with pytest.raises(ValueError, match=r"do not match hook_layers=\[1\]"):
        model.load_hook_state_dict(other_layer.hook_state_dict())
    other_rank = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[1], hook_rank=4)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), but this model expects \(8, 32\)"):
        model.load_hook_state_dict(other_rank.hook_state_dict())


def test_unknown_loss_rejected():
    assert parse_loss_weights("kl+mse") == {"kl": 1.0, "mse": 1.0}
    assert parse_loss_weights({"kl": 1.0, "ce": 0.0}) == {"kl": 1.0}
    with pytest.raises(ValueError, match=r"Unknown loss terms \['l2'\]"):
        parse_loss_weights("kl+l2")


# ---------------------------------------------------------------------------------------------- training


def calibration_blocks(num_blocks: int = 24, length: int = 16) -> datasets.Dataset:
    ids = random_ids(batch=num_blocks, length=length, seed=3).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def distillation_kl(model: HookMoEForCausalLM, input_ids: torch.Tensor) -> float:
    """Mean per-token KL from the full-k distribution to the model's, on all positions."""
    with model.disable_hookmoe():
        teacher = logits(model, input_ids).log_softmax(-1)
    student = logits(model, input_ids).log_softmax(-1)
    kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl.item() / (input_ids.shape[0] * input_ids.shape[1])


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    return TrainingArguments(**{**options, **overrides})


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_trainer_lowers_distillation_kl(base_dirs, tmp_path, family):
    model = HookMoEForCausalLM.from_base(base_dirs[family], top_k=1, hook_layers=[1], hook_rank=16)
    data = calibration_blocks()
    input_ids = torch.tensor(data["input_ids"])
    before = distillation_kl(model, input_ids)

    trainer = HookMoETrainer(model=model, args=training_args(tmp_path), train_dataset=data, loss="kl")
    trainer.train()

    after = distillation_kl(model, input_ids)
    assert after < 0.9 * before
    assert all(not parameter.requires_grad for parameter in model.model.parameters())
    logged = [entry for entry in trainer.state.log_history if "kl_loss" in entry]
    assert len(logged) == 3
    assert logged[-1]["kl_loss"] < logged[0]["kl_loss"]


@pytest.mark.parametrize("loss", ["kl+mse", "ce"])
def test_trainer_other_losses(base_dirs, tmp_path, loss):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[2], hook_rank=8)
    args = training_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer = HookMoETrainer(model=model, args=args, train_dataset=calibration_blocks(), loss=loss)
    trainer.train()

    assert model.hooks["2"].up_proj.weight.abs().sum() > 0
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    names = loss.split("+")
    for entry in logged:
        # The logged total is the sum of the logged terms (unit weights), also with gradient accumulation.
        assert entry["loss"] == pytest.approx(sum(entry[f"{name}_loss"] for name in names), rel=1e-3, abs=1e-5)


def test_trainer_checkpoint_resume(base_dirs, tmp_path):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[2], hook_rank=8)
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    HookMoETrainer(model=model, args=args, train_dataset=calibration_blocks()).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.hook_state_dict())

    resumed = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1, hook_layers=[2], hook_rank=8)
    trainer = HookMoETrainer(model=resumed, args=args, train_dataset=calibration_blocks())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    for key, tensor in resumed.hook_state_dict().items():
        torch.testing.assert_close(tensor, model.hook_state_dict()[key])


def test_trainer_rejects_model_without_hooks(base_dirs, tmp_path):
    model = HookMoEForCausalLM.from_base(base_dirs["olmoe"], top_k=1)
    with pytest.raises(ValueError, match="no hooks to train"):
        HookMoETrainer(model=model, args=training_args(tmp_path), train_dataset=calibration_blocks())


def test_calibration_dataset_blocks():
    dataset = build_calibration_dataset(make_char_tokenizer(), SAMPLE_TEXTS, num_sequences=5, seq_len=16)
    assert len(dataset) == 5
    assert all(len(row) == 16 for row in dataset["input_ids"])
    assert dataset["labels"] == dataset["input_ids"]
    assert VOCAB_SIZE - 1 in sum(dataset["input_ids"], [])  # documents are joined with EOS


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluate_hookmoe_settings(base_dirs):
    model = HookMoEForCausalLM.from_base(base_dirs["qwen3_moe"], top_k=1, hook_layers=[1])
    randomize_hooks(model)
    data = calibration_blocks(num_blocks=6)
    results = evaluate_hookmoe(model, data, batch_size=4, speed_prompts=random_ids(1, 8), new_tokens=3, repeats=1)

    base = AutoModelForCausalLM.from_pretrained(base_dirs["qwen3_moe"])
    base_metrics = evaluate_language_modeling(base, data, batch_size=4)
    assert results["settings"]["full_k"]["perplexity"] == pytest.approx(base_metrics["perplexity"], rel=1e-5)
    assert results["settings"]["full_k"]["perplexity_increase"] == 0.0
    assert set(results["settings"]) == {"full_k", "reduced_k", "reduced_k_hooks"}
    assert results["active_experts_per_token"]["reduction"] == 0.5
    assert results["speed"]["full_k"]["prefill_speedup"] == 1.0
    assert results["speed"]["reduced_k_hooks"]["prefill_seconds"] > 0
    assert results["targets"]["active_experts_reduction"] is True
    assert isinstance(results["gap_closed"], float)
    # Evaluation leaves the model as it found it.
    assert model.top_k_per_layer == [1, 1, 1, 1]
    assert model._hooks_enabled


def test_sensitivity_and_proposal(base_dirs, tmp_path):
    model = HookMoEForCausalLM.from_base(base_dirs["qwen2_moe"])
    results = layer_sensitivity(model, calibration_blocks(num_blocks=4), batch_size=4)
    assert [entry["layer"] for entry in results["layers"]] == [0, 2, 3]
    assert all(entry["k"] == 1 for entry in results["layers"])

    schedule = propose_schedule(results, NUM_LAYERS, target_reduction=0.15)
    assert schedule[1] is None
    assert sorted(k for k in schedule if k is not None) == [1, 2, 2]
    least_sensitive = min(results["layers"], key=lambda entry: entry["loss"])["layer"]
    assert schedule[least_sensitive] == 1

    plot_sensitivity(results, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert set(depth_trend(results)) == {
        "k",
        "spearman_layer_vs_increase",
        "lower_half_mean_increase",
        "upper_half_mean_increase",
    }
    assert model.top_k_per_layer == [2, None, 2, 2]


def test_propose_schedule_prefers_cheap_layers():
    sensitivity = {
        "original_top_k": 4,
        "baseline": {"loss": 1.0},
        "layers": [
            {"layer": 0, "k": 2, "loss": 1.50},
            {"layer": 0, "k": 1, "loss": 2.00},
            {"layer": 1, "k": 2, "loss": 1.10},
            {"layer": 1, "k": 1, "loss": 1.20},
        ],
    }
    # Greedy steps by loss increase per expert slot saved: layer 1 4->2 (0.05), layer 1 2->1 (0.10), layer 0 4->2 (0.25).
    assert propose_schedule(sensitivity, 2, target_reduction=0.25) == [4, 2]
    assert propose_schedule(sensitivity, 2, target_reduction=0.5) == [2, 1]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_top_k_parsing():
    assert parse_top_k("1") == 1
    assert parse_top_k("2,none,1,1") == [2, None, 1, 1]
    assert parse_top_k("upper half k=1") == "upper half k=1"
    assert format_schedule([2, None, 1, 1]) == "2,none,1,1"


def test_cli_calibrate_eval_sensitivity(base_dirs, tmp_path, capsys):
    data_file = tmp_path / "data.jsonl"
    with open(data_file, "w") as file:
        for text in SAMPLE_TEXTS * 4:
            file.write(json.dumps({"text": text}) + "\n")
    base = base_dirs["mixtral"]
    output_dir = tmp_path / "hookmoe"

    calibrate = [
        "hookmoe", "calibrate", "--base", base, "--top-k", "1", "--hook-layers", "2", "--hook-rank", "8",
        "--calibration-data", str(data_file), "--calibration-sequences", "8", "--seq-len", "16",
        "--max-steps", "3", "--batch-size", "4", "--output-dir", str(output_dir),
        "--eval-data", str(data_file), "--eval-sequences", "4", "--speed-prompt-len", "8",
        "--new-tokens", "2", "--repeats", "1",
    ]  # fmt: skip
    assert cli_main(calibrate) == 0
    for name in ("config.json", "model.safetensors", "README.md", "eval_results.json", "tokenizer.json"):
        assert (output_dir / name).is_file(), name
    card = (output_dir / "README.md").read_text()
    assert base in card
    assert "$base_model" not in card
    assert "$evaluation" not in card
    assert "perplexity gap closed by hooks" in card

    results_file = tmp_path / "eval.json"
    evaluate = [
        "hookmoe", "eval", "--model", str(output_dir), "--eval-data", str(data_file), "--eval-sequences", "4",
        "--seq-len", "16", "--no-speed", "--output-json", str(results_file),
    ]  # fmt: skip
    assert cli_main(evaluate) == 0
    with open(results_file) as file:
        assert set(json.load(file)["settings"]) == {"full_k", "reduced_k", "reduced_k_hooks"}

    plot = tmp_path / "sensitivity.png"
    sensitivity = [
        "hookmoe", "sensitivity", "--base", base, "--eval-data", str(data_file), "--eval-sequences", "4",
        "--seq-len", "16", "--plot", str(plot),
    ]  # fmt: skip
    assert cli_main(sensitivity) == 0
    output = capsys.readouterr().out
    assert "proposed --top-k for 50% fewer routed experts: 1,1,1,1" in output
    assert os.path.getsize(plot) > 0
