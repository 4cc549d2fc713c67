"""`edsd-hf train-draft` and `train_draft()`: train an EDSD draft for a target, end to end.

The pipeline loads the target, its tokenizer and the data, and holds out part of the data. It can
augment system prompts and regenerate the responses with the target. It then tokenizes, builds the
draft vocabulary from the training split and trains with [`EdsdTrainer`]. Last, it measures acceptance
on the held-out split and saves a loadable draft with a model card. Run it under `accelerate launch`
to train on several processes.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from transformers.utils import logging

from .configuration_edsd import EdsdConfig
from .curriculum import PACING_TYPES, EdsdCurriculumCallback
from .data import (
    EdsdDataCollator,
    augment_system_prompts,
    check_max_length,
    load_raw_dataset,
    read_examples,
    regenerate_chat_responses,
    regenerate_text,
    tokenize_examples,
)
from .modeling_edsd import EdsdDraftModel
from .trainer import EdsdTrainer
from .vocab import count_token_frequencies, draft_vocab_coverage, select_draft_vocab


logger = logging.get_logger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "edsd_draft_template.md"

# Default draft vocabulary: EAGLE-3's 32k most frequent tokens, or the whole vocabulary of a smaller target.
DEFAULT_DRAFT_VOCAB_SIZE = 32000

TRAINING_REPORT_NAME = "training_report.json"


@dataclass
class CurriculumSettings:
    """Entropy curriculum of a `train_draft` run; `baseline=True` trains the EAGLE-3-style baseline instead."""

    baseline: bool = False
    pacing: str = "epoch"
    drop_step: float = 0.02
    max_drop_ratio: float = 0.4
    max_ttt_depth: int = 7
    ttt_depth_per_epoch: list[int] | None = None
    full_final_phase: bool = False
    num_phases: int | None = None

    def build_callback(self) -> EdsdCurriculumCallback:
        if self.baseline:
            return EdsdCurriculumCallback.baseline(ttt_depth=self.max_ttt_depth)
        return EdsdCurriculumCallback(
            pacing=self.pacing,
            drop_step=self.drop_step,
            max_drop_ratio=self.max_drop_ratio,
            max_ttt_depth=self.max_ttt_depth,
            ttt_depth_per_epoch=self.ttt_depth_per_epoch,
            full_final_phase=self.full_final_phase,
            num_phases=self.num_phases,
        )

    def describe(self) -> str:
        if self.baseline:
            return f"none (EAGLE-3-style baseline: every valid position, TTT depth {self.max_ttt_depth})"
        depth = (
            f"TTT depth per epoch {self.ttt_depth_per_epoch}"
            if self.ttt_depth_per_epoch
            else f"TTT depth ceil(1 + {self.max_ttt_depth - 1} * phase / (E - 1))"
        )
        final = ", final phase on every token" if self.full_final_phase else ""
        return (
            f"{self.pacing}-paced entropy curriculum: drop ratio min(max((E - phase) * {self.drop_step}, 0), "
            f"{self.max_drop_ratio}), {depth}{final}"
        )


@dataclass
class RegenerationSettings:
    """Regeneration of the training responses by the target itself (off unless `enabled`)."""

    enabled: bool = False
    batch_size: int = 8
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    # Plain text only: the number of leading tokens of each text kept as the prompt.
    prompt_tokens: int = 32


@dataclass
class PreparedData:
    data_format: str
    train_dataset: datasets.Dataset
    heldout_dataset: datasets.Dataset | None
    heldout_prompts: list[list[int]] = field(default_factory=list)
    measurement_prompt: str = ""


# ----- loading ------------------------------------------------------------------------------------


def load_target(target: str | PreTrainedModel, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    if isinstance(target, PreTrainedModel):
        return target
    try:
        return AutoModelForCausalLM.from_pretrained(target, dtype=dtype or "auto")
    except OSError as err:
        raise ValueError(f"Could not load the target {target!r}: {err}") from err


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase | None, target: PreTrainedModel) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    source = tokenizer or target.name_or_path
    if not source:
        raise ValueError("The target was built in code, so pass its tokenizer: train_draft(..., tokenizer=...).")
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ValueError(f"Could not load the tokenizer {source!r}: {err}") from err


def split_examples(examples: list, heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and hold out `heldout_fraction` of the examples (at least one when there are two or more)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_heldout = round(heldout_fraction * len(examples))
    if heldout_fraction > 0 and len(examples) >= 2:
        num_heldout = max(num_heldout, 1)
    heldout = [examples[i] for i in order[:num_heldout]]
    train = [examples[i] for i in order[num_heldout:]]
    return train, heldout


def _rows_to_dataset(rows: list[dict], max_length: int) -> datasets.Dataset:
    rows = [{key: values[:max_length] for key, values in row.items()} for row in rows]
    for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
    return datasets.Dataset.from_list(rows)


def _measurement_prompts(examples: list, data_format: str, tokenizer, prompt_tokens: int) -> tuple[list[list[int]], str]:
    """Token prompts for measuring acceptance in `generate()`: each conversation's first user turn, or each text's head."""
    if data_format == "text":
        prompts = [tokenizer(text, add_special_tokens=True)["input_ids"][:prompt_tokens] for text in examples]
        return [prompt for prompt in prompts if prompt], f"the first {prompt_tokens} tokens of each text"
    prompts = []
    for messages in examples:
        first_assistant = next((i for i, message in enumerate(messages) if message["role"] == "assistant"), None)
        if first_assistant:
            prompts.append(
                tokenizer.apply_chat_template(
                    messages[:first_assistant], tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
            )
    return prompts, "the turns before each conversation's first assistant turn"


def prepare_data(
    data,
    tokenizer: PreTrainedTokenizerBase,
    target: PreTrainedModel,
    max_length: int,
    heldout_fraction: float,
    seed: int,
    regeneration: RegenerationSettings,
    system_prompts: list[str] | None,
    system_prompt_probability: float,
    overflow: str,
    data_split: str = "train",
) -> PreparedData:
    """Load, split, augment, regenerate and tokenize `data` (a path, a Hub id or a `datasets.Dataset`)."""
    raw = data if isinstance(data, datasets.Dataset) else load_raw_dataset(data, split=data_split)
    if len(raw) == 0:
        raise ValueError("The training dataset contains no rows.")
    data_format, examples = read_examples(raw)
    if not examples:
        raise ValueError(f"The data {data!r} contains no non-empty examples.")
    train_examples, heldout_examples = split_examples(examples, heldout_fraction, seed)
    if not train_examples:
        raise ValueError(f"No training examples are left after holding out {heldout_fraction:.0%} of {len(examples)}.")

    if system_prompts:
        if data_format == "text":
            raise ValueError("System-prompt augmentation needs chat data, but the data is plain text.")
        train_examples = augment_system_prompts(train_examples, system_prompts, system_prompt_probability, seed)

    prompts, prompt_description = _measurement_prompts(heldout_examples, data_format, tokenizer, regeneration.prompt_tokens)

    splits = {"train": train_examples, "heldout": heldout_examples}
    tokenized = {}
    for name, split_data in splits.items():
        if not split_data:
            tokenized[name] = None
            continue
        if regeneration.enabled and data_format == "text":
            rows = regenerate_text(
                split_data,
                target,
                tokenizer,
                prompt_tokens=regeneration.prompt_tokens,
                batch_size=regeneration.batch_size,
                max_new_tokens=regeneration.max_new_tokens,
                do_sample=regeneration.do_sample,
                temperature=regeneration.temperature,
            )
            tokenized[name] = _rows_to_dataset(rows, max_length)
            continue
        if regeneration.enabled:
            split_data = regenerate_chat_responses(
                split_data,
                target,
                tokenizer,
                batch_size=regeneration.batch_size,
                max_new_tokens=regeneration.max_new_tokens,
                do_sample=regeneration.do_sample,
                temperature=regeneration.temperature,
            )
        tokenized[name] = tokenize_examples(split_data, data_format, tokenizer, max_length, overflow=overflow)
    return PreparedData(data_format, tokenized["train"], tokenized["heldout"], prompts, prompt_description)


# ----- draft --------------------------------------------------------------------------------------


def build_draft(
    target: PreTrainedModel,
    train_dataset: datasets.Dataset,
    draft_vocab_size: int | None,
    fusion: str,
    target_layer_ids: list[int] | None,
) -> tuple[EdsdDraftModel, float]:
    """Build a draft for `target` with the most frequent training tokens as its vocabulary; return it and the coverage."""
    vocab_size = target.config.get_text_config().vocab_size
    draft_vocab_size = min(draft_vocab_size or DEFAULT_DRAFT_VOCAB_SIZE, vocab_size)
    counts = count_token_frequencies(train_dataset, vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError("The training data contains no tokens with the loss mask on: nothing to train the draft on.")
    draft_to_target = select_draft_vocab(counts, draft_vocab_size)

    config = EdsdConfig.from_target_config(
        target.config, target_layer_ids=target_layer_ids, draft_vocab_size=draft_vocab_size, fusion=fusion
    )
    # The draft stays in float32 whatever the target's dtype: mixed precision comes from the TrainingArguments.
    draft = EdsdDraftModel(config)
    draft.set_draft_vocab(draft_to_target)
    return draft, draft_vocab_coverage(draft_to_target, counts)


def measure_acceptance_length(
    target: PreTrainedModel,
    draft: EdsdDraftModel,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
) -> float | None:
    """Return the mean acceptance length of greedy `generate(assistant_model=draft)` over `prompts`.

    Returns None when there are no prompts.
    """
    if not prompts:
        return None
    device = target.get_input_embeddings().weight.device
    accepted = rounds = 0
    draft.eval()
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=device)
            target.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                assistant_model=draft,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=target.config.get_text_config().pad_token_id or 0,
            )
            stats = draft.speculation_stats
            accepted += stats.num_accepted
            rounds += stats.num_rounds
    return (accepted + rounds) / rounds if rounds else None


# ----- model card ---------------------------------------------------------------------------------


def write_model_card(output_dir: Path, report: dict) -> Path:
    """Fill `model_cards/edsd_draft_template.md` with the run's report and write it as the draft's README.md."""
    def format_figure(value, digits=3):
        return "not measured" if value is None else f"{value:.{digits}f}"

    eval_metrics = report["heldout"]
    step_accuracies = [
        f"{eval_metrics[key]:.2f}"
        for key in sorted((k for k in eval_metrics if k.startswith("eval_ttt_acc_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    ]
    fields = {
        **{key: report[key] for key in ("target", "data", "data_format", "fusion", "max_length", "ttt_step_weight")},
        "target_layer_ids": report["target_layer_ids"],
        "draft_vocab_size": report["draft_vocab_size"],
        "vocab_size": report["vocab_size"],
        "vocab_coverage": f"{100 * report['vocab_coverage']:.1f}%",
        "num_train": report["num_train_sequences"],
        "num_heldout": report["num_heldout_sequences"],
        "regenerated": "yes" if report["regenerated"] else "no",
        "system_prompt_augmentation": report["system_prompt_augmentation"],
        "num_epochs": report["num_epochs"],
        "num_steps": report["num_steps"],
        "curriculum": report["curriculum"],
        "train_loss": format_figure(report["train_loss"]),
        "eval_ttt_depth": report["eval_ttt_depth"],
        "estimated_acceptance_length": format_figure(eval_metrics.get("eval_acceptance_length")),
        "num_assistant_tokens": report["num_assistant_tokens"],
        "measured_acceptance_length": format_figure(report["measured_acceptance_length"]),
        "num_measured_prompts": report["num_measured_prompts"],
        "measurement_prompt": report["measurement_prompt"],
        "step_accuracies": ", ".join(step_accuracies) or "not measured",
        "edsd_hf_version": report["edsd_hf_version"],
        "transformers_version": transformers.__version__,
    }
    card = string.Template(MODEL_CARD_TEMPLATE.read_text()).substitute(fields)
    path = output_dir / "README.md"
    path.write_text(card)
    return path


# ----- train_draft --------------------------------------------------------------------------------


def train_draft(
    target: str | PreTrainedModel,
    data,
    output_dir: str | Path,
    *,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    draft_vocab_size: int | None = None,
    fusion: str = "edfuse",
    target_layer_ids: list[int] | None = None,
    max_length: int | None = None,
    overflow: str = "truncate",
    heldout_fraction: float = 0.05,
    curriculum: CurriculumSettings | None = None,
    ttt_step_weight: float = 0.8,
    regeneration: RegenerationSettings | None = None,
    system_prompts: list[str] | None = None,
    system_prompt_probability: float = 0.5,
    num_train_epochs: float = 4,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-4,
    warmup_steps: int = 0,
    save_steps: int | None = None,
    logging_steps: int = 10,
    seed: int = 0,
    resume_from_checkpoint: str | bool | None = None,
    measure_prompts: int = 16,
    measure_max_new_tokens: int = 64,
    dtype: str | torch.dtype | None = None,
    data_split: str = "train",
    training_args: dict | None = None,
) -> Path:
    """Train an EDSD draft for `target` on `data` and save it, with a model card, to `output_dir`.

    Args:
        target: Path or Hub id of a causal LM, or a loaded model (then pass `tokenizer`).
        data: Local JSON/JSONL/parquet/text file or directory, Hub dataset id, or a `datasets.Dataset`, with a
            `messages`, `conversations` (ShareGPT) or `text` column.
        output_dir: Where the draft (`config.json`, `model.safetensors`, `generation_config.json`), its
            `README.md` model card and `training_report.json` are written. Checkpoints go to
            `output_dir/checkpoints`.
        draft_vocab_size: Size of the draft vocabulary, the most frequent training tokens. Defaults to
            32000, or the target's vocabulary when it is smaller.
        max_length: Maximum training sequence length in tokens. Defaults to the target's context
            (`max_position_embeddings`), and may not exceed it.
        curriculum: The entropy curriculum; defaults to the published epoch-based schedules.
        regeneration: Regenerate the responses with the target first (off by default).
        system_prompts: Random system prompts given to `system_prompt_probability` of the training conversations.
        measure_prompts: Number of held-out prompts on which acceptance is measured with `generate()` (0 skips).
        training_args: Further `TrainingArguments` fields, which override the ones set here.

    Returns:
        The output directory.
    """
    output_dir = Path(output_dir)
    curriculum = curriculum or CurriculumSettings()
    regeneration = regeneration or RegenerationSettings()
    transformers.set_seed(seed)

    target = load_target(target, dtype)
    tokenizer = load_tokenizer(tokenizer, target)
    target_config = target.config.get_text_config()
    max_length = check_max_length(max_length, getattr(target_config, "max_position_embeddings", None))

    prepared = prepare_data(
        data,
        tokenizer,
        target,
        max_length,
        heldout_fraction,
        seed,
        regeneration,
        system_prompts,
        system_prompt_probability,
        overflow,
        data_split,
    )
    draft, coverage = build_draft(target, prepared.train_dataset, draft_vocab_size, fusion, target_layer_ids)

    arguments = {
        "output_dir": str(output_dir / "checkpoints"),
        "num_train_epochs": num_train_epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": per_device_train_batch_size,
        "per_device_eval_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate,
        "warmup_steps": warmup_steps,
        "logging_steps": logging_steps,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "eval_strategy": "epoch" if prepared.heldout_dataset is not None else "no",
        "seed": seed,
        "report_to": [],
    }
    arguments.update(training_args or {})
    args = TrainingArguments(**arguments)

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = EdsdTrainer(
        model=draft,
        target=target,
        args=args,
        curriculum=curriculum.build_callback(),
        baseline_ttt_depth=curriculum.max_ttt_depth,
        ttt_step_weight=ttt_step_weight,
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.heldout_dataset,
        data_collator=EdsdDataCollator(pad_token_id=pad_token_id or 0),
    )
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    heldout_metrics = trainer.evaluate() if prepared.heldout_dataset is not None else {}

    # `save_model` writes from the main process only, and every process must call it.
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return output_dir
    draft = trainer.draft
    measure = prepared.heldout_prompts[:measure_prompts]
    measured = measure_acceptance_length(target, draft, measure, measure_max_new_tokens) if measure else None

    from edsd_hf import __version__

    report = {
        "target": target.name_or_path or "a target built in code",
        "data": str(data) if isinstance(data, (str, Path)) else "a datasets.Dataset passed in code",
        "data_format": prepared.data_format,
        "fusion": draft.config.fusion,
        "target_layer_ids": draft.config.target_layer_ids,
        "draft_vocab_size": draft.config.draft_vocab_size,
        "vocab_size": draft.config.vocab_size,
        "vocab_coverage": coverage,
        "num_train_sequences": len(prepared.train_dataset),
        "num_heldout_sequences": len(prepared.heldout_dataset) if prepared.heldout_dataset is not None else 0,
        "regenerated": regeneration.enabled,
        "system_prompt_augmentation": (
            f"{len(system_prompts)} prompts, probability {system_prompt_probability}" if system_prompts else "none"
        ),
        "max_length": max_length,
        "num_epochs": trainer.state.num_train_epochs,
        "num_steps": trainer.state.global_step,
        "num_processes": trainer.args.world_size,
        "curriculum": curriculum.describe(),
        "ttt_step_weight": ttt_step_weight,
        "train_loss": train_output.training_loss,
        "eval_ttt_depth": trainer.eval_ttt_depth,
        "heldout": heldout_metrics,
        "num_assistant_tokens": draft.generation_config.num_assistant_tokens,
        "measured_acceptance_length": measured,
        "num_measured_prompts": len(measure),
        "measurement_prompt": prepared.measurement_prompt,
        "edsd_hf_version": __version__,
    }
    (output_dir / TRAINING_REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    write_model_card(output_dir, report)
    logger.info("Saved the EDSD draft and its model card to %s.", output_dir)
    return output_dir


# ----- command line -------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-draft",
        help="Train an EDSD draft for a target model with the entropy curriculum.",
        description=(
            "Train an EDSD draft for --target on --data and save it, a model card (README.md) and "
            "training_report.json to --output. Run under `accelerate launch` to use several processes."
        ),
    )
    parser.add_argument("--target", required=True, help="Path or Hub id of the target causal LM.")
    parser.add_argument(
        "--data",
        required=True,
        help="JSON/JSONL/parquet/text file or directory, or a Hub dataset id, with a `messages`, `conversations` "
        "(ShareGPT) or `text` column.",
    )
    parser.add_argument("--output", required=True, help="Directory for the trained draft and its model card.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer path or id. Default: the target's.")
    parser.add_argument("--data-split", default="train", help="Split of a Hub dataset to train on. Default: train.")

    draft = parser.add_argument_group("draft")
    draft.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help=f"Tokens in the draft vocabulary (the most frequent in the data). Default: {DEFAULT_DRAFT_VOCAB_SIZE} or "
        "the target's vocabulary if smaller.",
    )
    draft.add_argument("--fusion", choices=("edfuse", "concat"), default="edfuse", help="Draft fusion. Default: edfuse.")
    draft.add_argument(
        "--target-layers", type=_int_list, default=None, help="Comma-separated 0-based target layers the draft reads."
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--max-length", type=int, default=None, help="Maximum training sequence length in tokens. Default: the target's max_position_embeddings."
    )
    data.add_argument(
        "--overflow",
        choices=("truncate", "drop", "error"),
        default="truncate",
        help="What to do with conversations longer than --max-length. Default: truncate.",
    )
    data.add_argument(
        "--heldout-fraction", type=float, default=0.05, help="Fraction of examples held out. Default: 0.05."
    )
    data.add_argument(
        "--regenerate", action="store_true", help="Regenerate the responses (or text continuations) with the target."
    )
    data.add_argument(
        "--regenerate-max-new-tokens", type=int, default=256, help="Tokens per regenerated response. Default: 256."
    )
    data.add_argument("--regenerate-batch-size", type=int, default=8, help="Regeneration batch size. Default: 8.")
    data.add_argument(
        "--system-prompts",
        default=None,
        help="Text file with one system prompt per line, given at random to the training conversations.",
    )
    data.add_argument(
        "--system-prompt-probability",
        type=float,
        default=0.5,
        help="Share of conversations that get a random system prompt. Default: 0.5.",
    )

    schedule = parser.add_argument_group("curriculum")
    schedule.add_argument(
        "--baseline", action="store_true", help="Train the EAGLE-3-style baseline: no curriculum, fixed TTT depth."
    )
    schedule.add_argument(
        "--pacing",
        choices=[p for p in PACING_TYPES if p != "constant"],
        default="epoch",
        help="Schedule the curriculum per epoch (published) or on global_step / max_steps. Default: epoch.",
    )
    schedule.add_argument("--drop-step", type=float, default=0.02, help="Drop ratio removed per phase. Default: 0.02.")
    schedule.add_argument("--max-drop-ratio", type=float, default=0.4, help="Cap of the drop ratio. Default: 0.4.")
    schedule.add_argument("--max-ttt-depth", type=int, default=7, help="Deepest TTT unroll (S_max). Default: 7.")
    schedule.add_argument(
        "--ttt-depths", type=_int_list, default=None, help="Comma-separated TTT depth of each epoch, instead of S_max."
    )
    schedule.add_argument(
        "--full-final-phase", action="store_true", help="Train the final epoch (or phase) on every valid token."
    )
    schedule.add_argument("--num-phases", type=int, default=None, help="E of the schedules. Default: see docs.")
    schedule.add_argument(
        "--ttt-step-weight", type=float, default=0.8, help="Loss weight of TTT step i is this to the power i."
    )

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=float, default=4, help="Training epochs. Default: 4.")
    training.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps; overrides --epochs if > 0.")
    training.add_argument("--batch-size", type=int, default=8, help="Sequences per device per micro-batch. Default: 8.")
    training.add_argument("--grad-accum", type=int, default=1, help="Gradient-accumulation steps. Default: 1.")
    training.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate. Default: 1e-4.")
    training.add_argument("--warmup-steps", type=int, default=0, help="Linear warm-up steps. Default: 0.")
    training.add_argument("--save-steps", type=int, default=None, help="Write a checkpoint every N steps.")
    training.add_argument("--logging-steps", type=int, default=10, help="Log every N steps. Default: 10.")
    training.add_argument("--seed", type=int, default=0, help="Seed of the data split and training. Default: 0.")
    training.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="Resume from a checkpoint directory, or from the last one in --output/checkpoints without a value.",
    )
    training.add_argument("--dtype", default=None, help="Target dtype (float32, bfloat16, ...). Default: auto.")
    training.add_argument(
        "--measure-prompts", type=int, default=16, help="Held-out prompts for measuring acceptance in generate()."
    )
    training.add_argument("--use-cpu", action="store_true", help="Train on the CPU even when an accelerator exists.")
    parser.set_defaults(func=run_train_draft)


def run_train_draft(args: argparse.Namespace) -> int:
    system_prompts = None
    if args.system_prompts:
        path = Path(args.system_prompts)
        if not path.is_file():
            raise SystemExit(f"System-prompt file {args.system_prompts!r} not found.")
        system_prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]

    curriculum = CurriculumSettings(
        baseline=args.baseline,
        pacing=args.pacing,
        drop_step=args.drop_step,
        max_drop_ratio=args.max_drop_ratio,
        max_ttt_depth=args.max_ttt_depth,
        ttt_depth_per_epoch=args.ttt_depths,
        full_final_phase=args.full_final_phase,
        num_phases=args.num_phases,
    )
    regeneration = RegenerationSettings(
        enabled=args.regenerate, batch_size=args.regenerate_batch_size, max_new_tokens=args.regenerate_max_new_tokens
    )
    output_dir = train_draft(
        args.target,
        args.data,
        args.output,
        tokenizer=args.tokenizer,
        draft_vocab_size=args.draft_vocab_size,
        fusion=args.fusion,
        target_layer_ids=args.target_layers,
        max_length=args.max_length,
        overflow=args.overflow,
        heldout_fraction=args.heldout_fraction,
        curriculum=curriculum,
        ttt_step_weight=args.ttt_step_weight,
        regeneration=regeneration,
        system_prompts=system_prompts,
        system_prompt_probability=args.system_prompt_probability,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        resume_from_checkpoint=args.resume,
        measure_prompts=args.measure_prompts,
        dtype=args.dtype,
        data_split=args.data_split,
        training_args={"use_cpu": True} if args.use_cpu else None,
    )
    report_path = Path(output_dir) / TRAINING_REPORT_NAME
    # Under `accelerate launch` only the main process writes the report.
    if PartialState().is_main_process and report_path.is_file():
        report = json.loads(report_path.read_text())
        print(
            f"Saved the draft to {output_dir}: estimated acceptance length "
            f"{report['heldout'].get('eval_acceptance_length', float('nan')):.3f}, measured in generate() "
            f"{report['measured_acceptance_length']}."
        )
    return 0


__all__ = [
    "CurriculumSettings",
    "RegenerationSettings",
    "add_subcommands",
    "build_draft",
    "measure_acceptance_length",
    "prepare_data",
    "train_draft",
    "write_model_card",
]
