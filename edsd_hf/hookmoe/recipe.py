"""Train a small Qwen3-MoE from scratch on the Python standard library source, as a HookMoE base.

It uses the corpus, byte-level BPE tokenizer, training loop and report of the dense target recipe
(`edsd_hf.recipes`), with Qwen3-MoE decoder layers (8 routed experts, top-2) in place of Llama's MLPs. The
result is a normal transformers checkpoint that `AutoModelForCausalLM` loads offline.
"""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3MoeConfig, Qwen3MoeForCausalLM, set_seed
from transformers.utils import logging

from ..recipes.corpus import build_lm_blocks, collect_stdlib_files, train_tokenizer
from ..recipes.target import (
    SAMPLE_PROMPTS,
    TargetSize,
    build_run_report,
    evaluate_heldout,
    generate_samples,
    run_training,
    save_checkpoint,
    select_autocast_dtype,
    select_device,
)


logger = logging.get_logger(__name__)

# `intermediate_size` is the width of each routed expert. `max_steps` is set above what the wall-clock budget
# allows on 2 CPU cores, so `max_minutes` ends training and the learning-rate schedule follows the clock.
MOE_TARGET_SIZE = TargetSize(
    name="moe-small",
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=768,
    max_steps=4000,
    max_minutes=20,
    batch_size=8,
    block_size=256,
    learning_rate=2e-3,
    warmup_steps=40,
    vocab_size=4096,
    max_heldout_tokens=65_536,
)
NUM_EXPERTS = 8
TOP_K = 2
# Weight of the load-balancing loss during training; without it a few experts take most tokens.
ROUTER_AUX_LOSS_COEF = 0.01


def build_moe_model(size: TargetSize, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeForCausalLM:
    """Create a randomly initialised Qwen3-MoE whose vocabulary and special tokens match `tokenizer`."""
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        # Width of the dense MLP of layers listed in `mlp_only_layers`; there are none here.
        intermediate_size=size.intermediate_size,
        moe_intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        head_dim=size.hidden_size // size.num_attention_heads,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF,
        max_position_embeddings=size.block_size,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def train_moe_target(
    output_dir: str | Path,
    seed: int = 0,
    max_minutes: float | None = None,
    tokenizer_dir: str | Path | None = None,
    size: TargetSize = MOE_TARGET_SIZE,
) -> Path:
    """Train the MoE target and save checkpoint, tokenizer and `training_report.json` in `output_dir`.

    `tokenizer_dir` reuses a tokenizer of the dense target recipe; without it one is trained on the same
    training files with the same recipe. `max_minutes` overrides the size's wall-clock budget.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    max_minutes = size.max_minutes if max_minutes is None else max_minutes
    device = select_device()
    autocast_dtype = select_autocast_dtype(device) if device.type == "cuda" else None
    # NOTE: on CPU the run uses fp32: bf16 autocast was slower than fp32 for the grouped expert kernels on
    # the 2-core machine this recipe was sized on.

    train_files = collect_stdlib_files("train", max_files=size.max_train_files)
    heldout_files = collect_stdlib_files("heldout", max_files=size.max_heldout_files)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_files, size.vocab_size, output_dir)
    train_blocks = build_lm_blocks(train_files, tokenizer, size.block_size)
    heldout_blocks = build_lm_blocks(heldout_files, tokenizer, size.block_size, max_tokens=size.max_heldout_tokens)

    set_seed(seed)
    model = build_moe_model(size, tokenizer).to(device)
    logger.info(f"Training the MoE target ({model.num_parameters():,} parameters) on {device} for {max_minutes} min.")
    training = run_training(model, train_blocks, size, seed, max_minutes, device, autocast_dtype)
    # Router logits were needed only for the load-balancing loss; a saved model should not return them by default.
    model.config.output_router_logits = False
    heldout = evaluate_heldout(model, heldout_blocks, size.batch_size, device, autocast_dtype)
    samples = generate_samples(model, tokenizer, SAMPLE_PROMPTS, size.sample_new_tokens, device)

    report = build_run_report(
        size, seed, max_minutes, model, device, autocast_dtype, tokenizer, train_files, heldout_files, train_blocks, heldout_blocks
    )
    report["architecture"] = {"model_type": "qwen3_moe", "num_experts": NUM_EXPERTS, "num_experts_per_tok": TOP_K}
    report.update({"training": training, "heldout": heldout, "samples": samples})
    save_checkpoint(model, tokenizer, report, output_dir)
    return output_dir
