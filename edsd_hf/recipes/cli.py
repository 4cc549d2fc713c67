"""`edsd-hf train-target`: train a target or draft LM on the stdlib corpus from the command line."""

from __future__ import annotations

import argparse

from .target import TARGET_SIZES, read_report, train_target


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-target",
        help="Train a small Llama on the Python standard library source and save an HF checkpoint.",
        description=(
            "Train a Llama from scratch on the running interpreter's standard library source, then save the "
            "checkpoint, tokenizer and training_report.json (held-out loss, entropy, samples) to --output."
        ),
        epilog=(
            "On a machine whose cores other jobs also use, set OMP_WAIT_POLICY=PASSIVE: with the default busy "
            "waiting, two PyTorch threads on 2 shared cores trained 5x slower than one thread in a measurement."
        ),
    )
    parser.add_argument(
        "--size",
        choices=sorted(TARGET_SIZES),
        default="small",
        help="Recipe size: small (about 15 minutes of training on 2 CPU cores), bench (about an hour), "
        "draft-lm (a 2-layer draft for assisted generation) or tiny (seconds, for tests). Default: small.",
    )
    parser.add_argument("--output", required=True, help="Directory for the checkpoint and report.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for weight initialisation and batch order. Default: 0.")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="Wall-clock budget of the optimisation loop in minutes. Default: the size's own budget.",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Directory of an existing tokenizer to reuse, e.g. the target checkpoint when training draft-lm. "
        "Default: train a new BPE tokenizer.",
    )
    parser.set_defaults(func=run_train_target)


def format_report_summary(report: dict) -> str:
    training = report["training"]
    heldout = report["heldout"]
    entropy = heldout["entropy_nats"]
    lines = [
        f"size: {report['size']}  parameters: {report['num_parameters']:,}  device: {report['device']}",
        f"training: {training['steps']}/{training['max_steps']} steps, {training['tokens_seen']:,} tokens, "
        f"{training['wall_seconds']:.0f} s ({training['tokens_per_second']:.0f} tokens/s), stopped by {training['stopped_by']}",
        f"held-out loss: {heldout['loss_nats_per_token']:.3f} nats/token (perplexity {heldout['perplexity']:.1f}), "
        f"top-1 accuracy {heldout['top1_accuracy']:.3f}",
        f"held-out entropy (nats): mean {entropy['mean']:.2f}, p25 {entropy['p25']:.2f}, "
        f"median {entropy['median']:.2f}, p75 {entropy['p75']:.2f}",
    ]
    for sample in report["samples"][:2]:
        lines.append(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")
    return "\n".join(lines)


def run_train_target(args: argparse.Namespace) -> int:
    output_dir = train_target(
        args.size,
        args.output,
        seed=args.seed,
        max_minutes=args.max_minutes,
        tokenizer_dir=args.tokenizer,
    )
    print(format_report_summary(read_report(output_dir)))
    print(f"checkpoint: {output_dir}")
    return 0
