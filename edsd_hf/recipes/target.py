"""Train a small dense Llama from scratch on the Python standard library source.

The result is a normal transformers checkpoint (safetensors weights, config and tokenizer) that
`AutoModelForCausalLM` and `AutoTokenizer` load offline, plus `training_report.json` with the held-out
loss, the per-token entropy distribution of the model on held-out files and a few greedy samples.
The same recipe builds `draft-lm`, a much smaller standalone LM that serves as the draft model of
transformers' stock assisted generation.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, set_seed
from transformers.utils import logging

from .corpus import build_lm_blocks, collect_stdlib_files, stdlib_root, train_tokenizer

logger = logging.get_logger(__name__)

REPORT_FILE = "training_report.json"
# Written last, so its presence means the checkpoint and the report are complete.
COMPLETE_MARKER_FILE = "TRAINING_COMPLETE.json"

SAMPLE_PROMPTS = (
    "import os\nimport sys\n\n\ndef ",
    "class Queue:\n    def __init__(self",
    "    def __repr__(self):\n        return ",
    "for i in range(",
)


@dataclass(frozen=True)
class TargetSize:
    """Model shape and training budget of one named recipe size."""

    name: str
    # Model shape (LlamaConfig fields).
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    # Training budget: training stops at `max_steps` or after `max_minutes` of optimisation, whichever
    # comes first. None means no wall-clock limit.
    max_steps: int
    max_minutes: float | None
    batch_size: int
    block_size: int
    # AdamW with linear warmup, then cosine decay down to `min_lr_ratio * learning_rate`.
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    # Vocabulary of the BPE tokenizer trained when no tokenizer directory is given.
    vocab_size: int = 4096
    # Corpus slice (None uses every file of the split) and evaluation budget.
    max_train_files: int | None = None
    max_heldout_files: int | None = None
    max_heldout_tokens: int = 131_072
    sample_new_tokens: int = 48

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


# The step budgets come from throughput measured with bf16 autocast on 2 AMD EPYC cores with AVX512-BF16:
# the `small` shape trained at about 6,000 tokens/s on an idle machine, the `bench` shape at about 2,250
# (1,980 of its 2,400 steps in the hour). Other jobs on the same cores cut this by up to 3x, and then the
# wall-clock budget ends training earlier.
TARGET_SIZES: dict[str, TargetSize] = {
    "tiny": TargetSize(
        name="tiny",
        hidden_size=64,
        # Three layers: the fewest that the EAGLE-3-style baseline draft (three target layers) can read.
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=176,
        max_steps=40,
        max_minutes=None,
        batch_size=8,
        block_size=64,
        learning_rate=3e-3,
        warmup_steps=5,
        vocab_size=512,
        max_train_files=24,
        max_heldout_files=3,
        max_heldout_tokens=2048,
        sample_new_tokens=8,
    ),
    "draft-lm": TargetSize(
        name="draft-lm",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=352,
        max_steps=800,
        max_minutes=5,
        batch_size=16,
        block_size=256,
        learning_rate=3e-3,
        warmup_steps=50,
    ),
    "small": TargetSize(
        name="small",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=688,
        max_steps=2400,
        max_minutes=15,
        # A 15-minute CPU run trains on only a few million tokens, so batches of 8 x 256 tokens buy it twice
        # as many optimiser steps. NOTE: not yet compared with batches of 16 at equal wall-clock time.
        batch_size=8,
        block_size=256,
        learning_rate=2e-3,
        warmup_steps=150,
    ),
    "bench": TargetSize(
        name="bench",
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1024,
        max_steps=2400,
        max_minutes=60,
        batch_size=16,
        block_size=256,
        learning_rate=1.5e-3,
        warmup_steps=150,
    ),
}


def get_size(size: str | TargetSize) -> TargetSize:
    if isinstance(size, TargetSize):
        return size
    if size not in TARGET_SIZES:
        raise ValueError(f"Unknown target size {size!r}: choose one of {sorted(TARGET_SIZES)}.")
    return TARGET_SIZES[size]


# ----------------------------------------------------------------------------------------------------
# Device and precision


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def select_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Pick bf16 autocast where the hardware computes bf16 natively, else None (plain fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # NOTE: these torch.cpu checks are private API (present in torch 2.13). Without AVX512-BF16 or AMX,
    # the CPU has no bf16 matmul instructions, so training stays in fp32 there (a path not yet measured).
    has_avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if (has_avx512_bf16 or has_amx) else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------
# Model and optimiser


def build_model(size: TargetSize, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """Create a randomly initialised Llama whose vocabulary and special tokens match `tokenizer`."""
    if size.hidden_size % size.num_attention_heads != 0:
        raise ValueError(
            f"Invalid size {size.name!r}: hidden_size={size.hidden_size} is not divisible by "
            f"num_attention_heads={size.num_attention_heads}."
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.block_size,
        # Tying saves vocab_size * hidden_size parameters, a large share of a model this small.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_optimizer(model: torch.nn.Module, size: TargetSize) -> torch.optim.AdamW:
    # Weight decay applies to matrices (projections, embeddings) but not to the RMSNorm gains.
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": size.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=size.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def learning_rate_at(progress: float, size: TargetSize) -> float:
    """Return the learning rate at `progress` (0 to 1) through the training budget.

    The rate rises linearly over the first `warmup_steps / max_steps` of the budget, then decays along
    a cosine to `min_lr_ratio * learning_rate`. With progress = step / max_steps, the warmup reaches the
    peak rate at step `warmup_steps - 1`.
    """
    warmup_fraction = size.warmup_steps / size.max_steps
    if progress < warmup_fraction:
        return size.learning_rate * min(1.0, (progress + 1.0 / size.max_steps) / warmup_fraction)
    decay_progress = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-8)
    decay_progress = min(decay_progress, 1.0)
    min_lr = size.learning_rate * size.min_lr_ratio
    return min_lr + 0.5 * (size.learning_rate - min_lr) * (1.0 + math.cos(math.pi * decay_progress))


# ----------------------------------------------------------------------------------------------------
# Training loop


def iterate_batches(blocks: torch.Tensor, batch_size: int, seed: int):
    """Yield batches of blocks forever, reshuffling with a seeded generator at every epoch."""
    generator = torch.Generator().manual_seed(seed)
    num_batches = blocks.shape[0] // batch_size
    if num_batches == 0:
        raise ValueError(
            f"Only {blocks.shape[0]} training blocks, fewer than batch_size={batch_size}: use more training files."
        )
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for start in range(0, num_batches * batch_size, batch_size):
            yield blocks[order[start : start + batch_size]]


def training_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    grad_clip_norm: float,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> float:
    """Run one forward, backward and optimiser step on a batch, and return its loss."""
    with autocast(device, autocast_dtype):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_training(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    size: TargetSize,
    seed: int,
    max_minutes: float | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict:
    """Optimise `model` on `blocks` until the step or wall-clock budget runs out, and return statistics.

    With a wall-clock budget the cosine schedule follows whichever budget is further along, so a slow
    machine still ends training at the minimum learning rate. Runs are bitwise reproducible only while
    the step count leads, which the report records as `schedule_followed_clock=False`.
    """
    max_seconds = None if max_minutes is None else 60.0 * max_minutes
    optimizer = build_optimizer(model, size)
    batches = iterate_batches(blocks, size.batch_size, seed)
    log_every = max(1, size.max_steps // 50)

    model.train()
    loss_curve, window_losses = [], []
    schedule_followed_clock = False
    stopped_by = "steps"
    step = 0
    start = time.monotonic()
    progress_bar = tqdm(total=size.max_steps, desc=f"Training {size.name}", unit="step")
    while step < size.max_steps:
        elapsed = time.monotonic() - start
        if max_seconds is not None and elapsed >= max_seconds:
            stopped_by = "time"
            break
        progress = step / size.max_steps
        if max_seconds is not None and elapsed / max_seconds > progress:
            progress = elapsed / max_seconds
            schedule_followed_clock = True
        learning_rate = learning_rate_at(progress, size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        input_ids = next(batches).to(device)
        loss = training_step(model, optimizer, input_ids, size.grad_clip_norm, device, autocast_dtype)
        step += 1
        window_losses.append(loss)
        if step % log_every == 0 or step == size.max_steps:
            mean_loss = sum(window_losses) / len(window_losses)
            loss_curve.append([step, round(mean_loss, 4)])
            window_losses.clear()
            progress_bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{learning_rate:.2e}")
        progress_bar.update(1)
    progress_bar.close()

    wall_seconds = time.monotonic() - start
    if stopped_by == "time":
        logger.warning(
            f"Training of {size.name!r} stopped by its {max_minutes}-minute budget after {step} of "
            f"{size.max_steps} steps. Raise max_minutes to run every step."
        )
    return {
        "steps": step,
        "max_steps": size.max_steps,
        "stopped_by": stopped_by,
        "schedule_followed_clock": schedule_followed_clock,
        "tokens_seen": step * size.tokens_per_step,
        "wall_seconds": round(wall_seconds, 1),
        "tokens_per_second": round(step * size.tokens_per_step / max(wall_seconds, 1e-9), 1),
        "final_train_loss": loss_curve[-1][1] if loss_curve else None,
        "train_loss_curve": loss_curve,
    }


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _quantile(values: torch.Tensor, q: float) -> float:
    return round(torch.quantile(values, q).item(), 4)


@torch.no_grad()
def evaluate_heldout(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict:
    """Measure next-token loss, top-1 accuracy and predictive entropy (nats) on held-out blocks."""
    model.eval()
    token_losses, token_entropies, token_correct = [], [], []
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="Held-out evaluation", unit="batch", leave=False):
        input_ids = blocks[start : start + batch_size].to(device)
        with autocast(device, autocast_dtype):
            logits = model(input_ids=input_ids).logits
        # Loss and entropy use fp32 because bf16 log-probabilities are too coarse for these statistics.
        log_probs = logits[:, :-1].float().log_softmax(dim=-1)
        targets = input_ids[:, 1:]
        token_losses.append(-log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).flatten().cpu())
        token_entropies.append(-(log_probs.exp() * log_probs).sum(dim=-1).flatten().cpu())
        token_correct.append((log_probs.argmax(dim=-1) == targets).flatten().cpu())

    losses = torch.cat(token_losses)
    entropies = torch.cat(token_entropies)
    loss = losses.mean().item()
    return {
        "tokens": losses.numel(),
        "loss_nats_per_token": round(loss, 4),
        "perplexity": round(math.exp(loss), 3),
        "top1_accuracy": round(torch.cat(token_correct).float().mean().item(), 4),
        "entropy_nats": {
            "mean": round(entropies.mean().item(), 4),
            "p10": _quantile(entropies, 0.10),
            "p25": _quantile(entropies, 0.25),
            "median": _quantile(entropies, 0.50),
            "p75": _quantile(entropies, 0.75),
            "p90": _quantile(entropies, 0.90),
        },
    }


@torch.no_grad()
def generate_samples(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    device: torch.device,
) -> list[dict]:
    """Continue each prompt greedily and return the prompt with its decoded continuation."""
    model.eval()
    samples = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        output_ids = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        completion = tokenizer.decode(output_ids[0, input_ids.shape[1] :], skip_special_tokens=False)
        samples.append({"prompt": prompt, "completion": completion})
    return samples


# ----------------------------------------------------------------------------------------------------
# Recipe entry points


def prepare_tokenizer(
    size: TargetSize, train_files: list[Path], output_dir: Path, tokenizer_dir: str | Path | None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer from `tokenizer_dir`, or train a new one on `train_files` and save it to `output_dir`."""
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer in {tokenizer_dir} has no EOS token: pass a tokenizer made by this recipe.")
        return tokenizer
    if size.name == "draft-lm":
        logger.warning(
            "Training draft-lm with its own tokenizer: assisted generation needs the draft to share the "
            "target's tokenizer, so pass the target checkpoint as tokenizer_dir."
        )
    return train_tokenizer(train_files, size.vocab_size, output_dir)


def train_target(
    size: str | TargetSize,
    output_dir: str | Path,
    seed: int = 0,
    max_minutes: float | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Train a Llama of the named size on the stdlib corpus and save checkpoint and report in `output_dir`.

    `max_minutes` overrides the size's wall-clock budget for the optimisation loop. Data preparation,
    evaluation and saving take extra time on top of it. `tokenizer_dir` reuses an existing tokenizer, so that a target
    and its draft LM share one vocabulary. Returns `output_dir`.
    """
    size = get_size(size)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / COMPLETE_MARKER_FILE).unlink(missing_ok=True)
    max_minutes = size.max_minutes if max_minutes is None else max_minutes
    device = select_device()
    autocast_dtype = select_autocast_dtype(device)
    logger.info(f"Training {size.name!r} on {device} (autocast dtype: {autocast_dtype}), seed={seed}.")

    train_files = collect_stdlib_files("train", max_files=size.max_train_files)
    heldout_files = collect_stdlib_files("heldout", max_files=size.max_heldout_files)
    tokenizer = prepare_tokenizer(size, train_files, output_dir, tokenizer_dir)
    train_blocks = build_lm_blocks(train_files, tokenizer, size.block_size)
    heldout_blocks = build_lm_blocks(heldout_files, tokenizer, size.block_size, max_tokens=size.max_heldout_tokens)

    set_seed(seed)
    model = build_model(size, tokenizer).to(device)
    training = run_training(model, train_blocks, size, seed, max_minutes, device, autocast_dtype)
    heldout = evaluate_heldout(model, heldout_blocks, size.batch_size, device, autocast_dtype)
    samples = generate_samples(model, tokenizer, SAMPLE_PROMPTS, size.sample_new_tokens, device)

    report = build_run_report(
        size, seed, max_minutes, model, device, autocast_dtype, tokenizer, train_files, heldout_files, train_blocks, heldout_blocks
    )
    report.update({"training": training, "heldout": heldout, "samples": samples})
    save_checkpoint(model, tokenizer, report, output_dir)
    return output_dir


def build_run_report(
    size: TargetSize,
    seed: int,
    max_minutes: float | None,
    model: torch.nn.Module,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    tokenizer: PreTrainedTokenizerBase,
    train_files: list[Path],
    heldout_files: list[Path],
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
) -> dict:
    """Describe a training run (recipe, model size, machine, corpus) for `training_report.json`."""
    return {
        "size": size.name,
        "seed": seed,
        "size_config": asdict(size),
        "max_minutes": max_minutes,
        "num_parameters": model.num_parameters(),
        "num_non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "device": str(device),
        "autocast_dtype": str(autocast_dtype) if autocast_dtype else None,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            # Other processes competing for the CPU slow training down, and the load average shows it.
            "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()],
        },
        "corpus": {
            "stdlib_root": str(stdlib_root()),
            "python_version": platform.python_version(),
            "train_files": len(train_files),
            "heldout_files": len(heldout_files),
            "train_tokens": train_blocks.numel(),
            "heldout_tokens": heldout_blocks.numel(),
            "vocab_size": len(tokenizer),
        },
    }


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, report: dict, output_dir: Path) -> None:
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    marker = {"size": report["size"], "seed": report["seed"], "size_config": report["size_config"]}
    (output_dir / COMPLETE_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info(f"Saved the {report['size']!r} checkpoint and {REPORT_FILE} to {output_dir}.")


def is_complete_checkpoint(output_dir: Path, size: TargetSize, seed: int, tokenizer_dir: str | Path | None = None) -> bool:
    """Check for a finished run in `output_dir` with this size configuration, seed and, if given, tokenizer vocabulary."""
    marker_path = output_dir / COMPLETE_MARKER_FILE
    if not marker_path.is_file():
        return False
    marker = json.loads(marker_path.read_text())
    if marker.get("seed") != seed or marker.get("size_config") != asdict(size):
        logger.warning(f"The checkpoint in {output_dir} was trained with another seed or size configuration, so it is retrained.")
        return False
    if tokenizer_dir is not None:
        # A draft LM cached before its target was retrained would otherwise keep the old vocabulary.
        cached_vocab = AutoTokenizer.from_pretrained(output_dir).get_vocab()
        if cached_vocab != AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab():
            logger.warning(f"The checkpoint in {output_dir} uses another vocabulary than {tokenizer_dir}, so it is retrained.")
            return False
    return True


def load_or_train_target(
    size: str | TargetSize,
    cache_dir: str | Path,
    seed: int = 0,
    max_minutes: float | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Return the checkpoint directory `cache_dir/<size>-seed<seed>`, training it first unless a finished run is there.

    A run counts as finished when its marker file records the same size configuration and seed, and,
    when `tokenizer_dir` is given, when its tokenizer has the same vocabulary.
    """
    size = get_size(size)
    output_dir = Path(cache_dir) / f"{size.name}-seed{seed}"
    if is_complete_checkpoint(output_dir, size, seed, tokenizer_dir):
        logger.info(f"Reusing the finished {size.name!r} checkpoint in {output_dir}.")
        return output_dir
    return train_target(size, output_dir, seed=seed, max_minutes=max_minutes, tokenizer_dir=tokenizer_dir)


def evaluate_checkpoint(checkpoint_dir: str | Path, max_heldout_tokens: int = 131_072, batch_size: int = 16) -> dict:
    """Load a saved checkpoint and measure its held-out loss, accuracy and entropy on the current held-out split.

    Blocks are as long as the model's `max_position_embeddings`, the length it was trained on.
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    device = select_device()
    model.to(device)
    block_size = model.config.max_position_embeddings
    heldout_blocks = build_lm_blocks(collect_stdlib_files("heldout"), tokenizer, block_size, max_tokens=max_heldout_tokens)
    return evaluate_heldout(model, heldout_blocks, batch_size, device, select_autocast_dtype(device))


def read_report(checkpoint_dir: str | Path) -> dict:
    report_path = Path(checkpoint_dir) / REPORT_FILE
    if not report_path.is_file():
        raise FileNotFoundError(f"No {REPORT_FILE} in {checkpoint_dir}: train the checkpoint with train_target first.")
    return json.loads(report_path.read_text())
