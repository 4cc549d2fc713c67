"""`edsd-hf hookmoe calibrate | eval | sensitivity`: train hooks, compare settings, and find sensitive layers."""

import argparse
import json
import os

import torch
from transformers import AutoTokenizer, TrainingArguments, set_seed
from transformers.utils import logging

from .data import build_calibration_dataset
from .evaluation import evaluate_hookmoe, format_report
from .model_card import write_model_card
from .modeling_hookmoe import HookMoEForCausalLM
from .sensitivity import depth_trend, format_sensitivity_table, layer_sensitivity, plot_sensitivity, propose_schedule
from .trainer import HookMoETrainer


logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_top_k(text: str) -> int | list[int | None] | str:
    """Parse `--top-k`: an int (`1`), a comma-separated list per layer (`2,none,1,1`) or a rule (`upper half k=1`)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parts = [part.strip().lower() for part in text.split(",")]
    if len(parts) > 1 and all(part.isdigit() or part == "none" for part in parts):
        return [None if part == "none" else int(part) for part in parts]
    return text


def format_schedule(schedule: list[int | None]) -> str:
    """Format a per-layer schedule the way `--top-k` reads it back."""
    return ",".join("none" if k is None else str(k) for k in schedule)


def _add_data_arguments(parser: argparse.ArgumentParser, name: str, default_sequences: int) -> None:
    parser.add_argument(
        f"--{name}-data",
        required=name == "calibration",
        help="Text source: 'stdlib:train', 'stdlib:heldout', a .txt/.jsonl/.json/.csv/.parquet file, a directory "
        "written by Dataset.save_to_disk, or a Hub dataset id.",
    )
    parser.add_argument(f"--{name}-sequences", type=int, default=default_sequences, help="Number of token blocks.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per block (default: 256).")
    parser.add_argument("--text-column", default="text", help="Column that contains the documents (default: text).")


def _add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", help="Tokenizer name or path (default: the model's, else the base's).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Dtype of the base weights.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data shuffling and training (default: 0).")


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-speed", action="store_true", help="Skip the prefill and decode timing.")
    parser.add_argument("--speed-batch-size", type=int, default=1, help="Prompts per timed batch (default: 1).")
    parser.add_argument("--speed-prompt-len", type=int, default=256, help="Prompt tokens per timed prefill.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per timed decode.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per setting (default: 5). The median is reported.")


def add_subcommands(subparsers) -> None:
    hookmoe = subparsers.add_parser(
        "hookmoe", help="Run an MoE model with fewer experts per token and train hooks that compensate."
    )
    commands = hookmoe.add_subparsers(dest="hookmoe_command", metavar="COMMAND", required=True)

    calibrate = commands.add_parser("calibrate", help="Train hooks by distillation from the base at full top-k.")
    calibrate.add_argument("--base", required=True, help="Hub id or local path of the MoE base model.")
    calibrate.add_argument("--top-k", required=True, type=parse_top_k, help="Reduced k: int, per-layer list or rule.")
    calibrate.add_argument("--hook-layers", required=True, type=int, nargs="+", help="0-based decoder layers to hook.")
    calibrate.add_argument("--hook-rank", type=int, default=64, help="Hook bottleneck width (default: 64).")
    calibrate.add_argument("--hook-activation", default="silu", help="Hook activation, an ACT2FN key (default: silu).")
    calibrate.add_argument("--no-hook-input-norm", action="store_true", help="Drop the RMSNorm on the hook input.")
    calibrate.add_argument(
        "--norm-topk-prob",
        choices=["keep", "true", "false"],
        default="keep",
        help="Renormalise the selected experts' weights at reduced k (default: keep the base's behaviour).",
    )
    calibrate.add_argument("--output-dir", required=True, help="Directory for the config, hooks, tokenizer and card.")
    _add_data_arguments(calibrate, "calibration", 256)
    calibrate.add_argument("--eval-data", help="Held-out text source. When given, the result is evaluated after training.")
    calibrate.add_argument("--eval-sequences", type=int, default=64, help="Held-out blocks (default: 64).")
    calibrate.add_argument("--loss", default="kl", help="Loss terms joined by '+': kl, mse, ce (default: kl).")
    calibrate.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature of the KL term.")
    calibrate.add_argument("--learning-rate", type=float, default=1e-3, help="Peak learning rate (default: 1e-3).")
    calibrate.add_argument("--epochs", type=float, default=1.0, help="Passes over the calibration set (default: 1).")
    calibrate.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps. A value above 0 overrides --epochs.")
    calibrate.add_argument("--batch-size", type=int, default=8, help="Blocks per device per step (default: 8).")
    calibrate.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per step.")
    calibrate.add_argument(
        "--warmup-ratio", type=float, default=0.05, help="Share of optimizer steps spent warming up (default: 0.05)."
    )
    calibrate.add_argument("--gradient-checkpointing", action="store_true", help="Recompute layers in backward.")
    calibrate.add_argument("--logging-steps", type=int, default=10, help="Steps between loss logs (default: 10).")
    _add_loading_arguments(calibrate)
    _add_speed_arguments(calibrate)
    calibrate.set_defaults(func=run_calibrate)

    evaluate = commands.add_parser("eval", help="Compare full k, reduced k and reduced k with hooks.")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HookMoE checkpoint written by `calibrate` (or save_pretrained).")
    source.add_argument("--base", help="MoE base to evaluate at --top-k without hooks.")
    evaluate.add_argument("--base-model", help="With --model: load the hooks onto this base instead of the saved one.")
    evaluate.add_argument("--top-k", type=parse_top_k, help="With --base: reduced k (int, per-layer list or rule).")
    _add_data_arguments(evaluate, "eval", 64)
    evaluate.add_argument("--batch-size", type=int, default=8, help="Blocks per evaluation batch (default: 8).")
    evaluate.add_argument("--output-json", help="Write the results to this JSON file.")
    _add_loading_arguments(evaluate)
    _add_speed_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    sensitivity = commands.add_parser("sensitivity", help="Measure each layer's sensitivity to a reduced k.")
    sensitivity.add_argument("--base", required=True, help="Hub id or local path of the MoE base model.")
    sensitivity.add_argument("--k", type=int, nargs="+", help="Reduced ks to test (default: 1 to original k - 1).")
    _add_data_arguments(sensitivity, "eval", 32)
    sensitivity.add_argument("--batch-size", type=int, default=8, help="Blocks per evaluation batch (default: 8).")
    sensitivity.add_argument(
        "--target-reduction", type=float, default=0.5, help="Share of routed experts the proposal removes."
    )
    sensitivity.add_argument("--plot", default="hookmoe_sensitivity.png", help="Path of the saved bar chart.")
    sensitivity.add_argument("--output-json", help="Write the measurements and the proposal to this JSON file.")
    _add_loading_arguments(sensitivity)
    sensitivity.set_defaults(func=run_sensitivity)

    train_target = commands.add_parser(
        "train-target", help="Train the small Qwen3-MoE base (8 experts, top-2) on the Python stdlib source."
    )
    train_target.add_argument("--output-dir", required=True, help="Directory for the checkpoint and its report.")
    train_target.add_argument("--max-minutes", type=float, help="Wall-clock budget of the training loop (default: 20).")
    train_target.add_argument("--tokenizer-dir", help="Reuse this tokenizer (for example the dense target's).")
    train_target.add_argument("--seed", type=int, default=0, help="Seed of initialisation and batch order.")
    train_target.set_defaults(func=run_train_target)


def _load_tokenizer(args, *candidates: str | None):
    """Load `--tokenizer`, or the first candidate directory or id that has a tokenizer."""
    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    errors = []
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError) as error:
            errors.append(f"{candidate}: {error}")
    raise SystemExit(f"No tokenizer found ({'; '.join(errors)}). Pass --tokenizer.")


def _speed_prompts(args, dataset):
    if args.no_speed:
        return None
    if args.speed_prompt_len > args.seq_len:
        raise SystemExit(f"--speed-prompt-len {args.speed_prompt_len} exceeds --seq-len {args.seq_len}. Lower it or raise --seq-len.")
    if args.speed_batch_size > len(dataset):
        raise SystemExit(f"--speed-batch-size {args.speed_batch_size} exceeds the {len(dataset)} evaluation blocks.")
    return torch.tensor(dataset[: args.speed_batch_size]["input_ids"])[:, : args.speed_prompt_len]


def _norm_topk_prob(choice: str) -> bool | None:
    return {"keep": None, "true": True, "false": False}[choice]


def run_calibrate(args) -> int:
    set_seed(args.seed)
    model = HookMoEForCausalLM.from_base(
        args.base,
        top_k=args.top_k,
        hook_layers=args.hook_layers,
        hook_rank=args.hook_rank,
        hook_activation=args.hook_activation,
        hook_input_norm=not args.no_hook_input_norm,
        norm_topk_prob=_norm_topk_prob(args.norm_topk_prob),
        dtype=DTYPES[args.dtype],
    )
    tokenizer = _load_tokenizer(args, args.base)
    train_dataset = build_calibration_dataset(
        tokenizer, args.calibration_data, args.calibration_sequences, args.seq_len, args.text_column, args.seed
    )
    print(
        f"HookMoE: top-k per layer {format_schedule(model.top_k_per_layer)} "
        f"({model.config.active_experts_per_token:.2f} of {model.config.original_top_k} routed experts per token), "
        f"hooks on layers {model.config.hook_layers}, "
        f"{sum(p.numel() for p in model.hooks.parameters()):,} trainable parameters, "
        f"{len(train_dataset)} calibration blocks of {args.seq_len} tokens."
    )

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        activation_checkpointing=args.gradient_checkpointing,
    )
    trainer = HookMoETrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=args.loss, temperature=args.temperature
    )
    train_result = trainer.train()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved HookMoE config and hooks to {args.output_dir} (training loss {train_result.training_loss:.6f}).")

    evaluation = None
    if args.eval_data:
        evaluation = _evaluate_and_report(args, model, tokenizer, os.path.join(args.output_dir, "eval_results.json"))

    calibration = (
        f"Trained on {len(train_dataset)} blocks of {args.seq_len} tokens from `{args.calibration_data}` with loss "
        f"`{args.loss}` (temperature {args.temperature}), {trainer.state.global_step} optimizer steps, batch size "
        f"{args.batch_size} x {args.gradient_accumulation_steps}, peak learning rate {args.learning_rate}, "
        f"final training loss {train_result.training_loss:.6f}."
    )
    card = write_model_card(args.output_dir, model, calibration=calibration, evaluation=evaluation)
    print(f"Wrote model card {card}.")
    return 0


def run_eval(args) -> int:
    set_seed(args.seed)
    if args.model:
        if args.top_k is not None:
            raise SystemExit("--top-k applies only to --base, because a --model checkpoint carries its own schedule.")
        model = HookMoEForCausalLM.from_pretrained(args.model, base_model=args.base_model, dtype=DTYPES[args.dtype])
        tokenizer = _load_tokenizer(args, args.model, model.config.base_model_name_or_path)
    else:
        if args.top_k is None:
            raise SystemExit("--base needs --top-k, the reduced k to compare with the base's own.")
        model = HookMoEForCausalLM.from_base(args.base, top_k=args.top_k, dtype=DTYPES[args.dtype])
        tokenizer = _load_tokenizer(args, args.base)
    if not args.eval_data:
        raise SystemExit("--eval-data is required: the held-out text to measure perplexity on.")

    _evaluate_and_report(args, model, tokenizer, args.output_json)
    return 0


def _evaluate_and_report(args, model, tokenizer, output_path: str | None) -> dict:
    """Evaluate on `--eval-data`, print the report and write it as JSON to `output_path` when given."""
    eval_dataset = build_calibration_dataset(
        tokenizer, args.eval_data, args.eval_sequences, args.seq_len, args.text_column, args.seed
    )
    results = evaluate_hookmoe(
        model,
        eval_dataset,
        batch_size=args.batch_size,
        speed_prompts=_speed_prompts(args, eval_dataset),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    print(format_report(results))
    if output_path:
        with open(output_path, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return results


def run_sensitivity(args) -> int:
    set_seed(args.seed)
    model = HookMoEForCausalLM.from_base(args.base, dtype=DTYPES[args.dtype])
    tokenizer = _load_tokenizer(args, args.base)
    if not args.eval_data:
        raise SystemExit("--eval-data is required: the held-out text to measure perplexity on.")
    eval_dataset = build_calibration_dataset(
        tokenizer, args.eval_data, args.eval_sequences, args.seq_len, args.text_column, args.seed
    )

    results = layer_sensitivity(model, eval_dataset, reduced_ks=args.k, batch_size=args.batch_size)
    trend = depth_trend(results)
    schedule = propose_schedule(results, len(model.top_k_per_layer), args.target_reduction)
    plot_sensitivity(results, args.plot)

    print(format_sensitivity_table(results))
    print(
        f"depth trend at k={trend['k']}: Spearman(layer, perplexity increase) = "
        f"{trend['spearman_layer_vs_increase']:+.2f}, mean increase lower half {trend['lower_half_mean_increase']:+.2%}, "
        f"upper half {trend['upper_half_mean_increase']:+.2%}"
    )
    print(f"proposed --top-k for {args.target_reduction:.0%} fewer routed experts: {format_schedule(schedule)}")
    print(f"saved plot {args.plot}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump({**results, "depth_trend": trend, "proposed_top_k": schedule}, file, indent=2)
    return 0


def run_train_target(args) -> int:
    # Imported here: the recipe pulls in the corpus and training modules, which the other commands do not need.
    from .recipe import train_moe_target

    output_dir = train_moe_target(args.output_dir, args.seed, args.max_minutes, args.tokenizer_dir)
    with open(output_dir / "training_report.json", encoding="utf-8") as file:
        report = json.load(file)
    print(
        f"Saved the MoE target to {output_dir}: {report['num_parameters']:,} parameters, "
        f"{report['training']['steps']} steps in {report['training']['wall_seconds']} s, held-out perplexity "
        f"{report['heldout']['perplexity']}."
    )
    return 0
