"""`edsd-hf demo`: the whole EDSD pipeline on a target grown here from the Python standard library.

Stages, each cached under `--cache-dir` and reused on the next run:
1. the target (Llama trained from scratch on stdlib source) and a small standalone draft LM with
   the same tokenizer, for HF's stock assisted generation;
2. draft training data: chunks of training-split source files, as JSONL `text` rows, continued
   by the target itself (`--regenerate`, on by default);
3. two drafts trained with the same budget: EDSD (EDFuse + entropy curriculum) and the
   EAGLE-3-style baseline (concatenation, no curriculum);
4. prompts: the first lines of held-out stdlib files, which no model saw in training;
5. the side-by-side benchmark, printed and written as JSON and PNG.
"""

import argparse
import json
import os
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("EDSD_HF_HOME", Path.home() / ".cache" / "edsd_hf"))
FINISHED_MARKER = "finished.json"


def write_training_texts(output_path: Path, max_rows: int, lines_per_chunk: int, max_files: int | None) -> Path:
    """Write chunks of training-split stdlib files as `{"text": ...}` rows."""
    from .recipes.corpus import collect_stdlib_files, read_source

    if output_path.is_file():
        return output_path
    rows = []
    for path in collect_stdlib_files("train", max_files=max_files):
        lines = read_source(path).splitlines()
        for start in range(0, len(lines), lines_per_chunk):
            chunk = "\n".join(lines[start : start + lines_per_chunk]).strip()
            if len(chunk) >= 200:
                rows.append({"text": chunk})
        if len(rows) >= max_rows:
            break
    if not rows:
        raise ValueError("No training text could be read from the standard library source.")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows[:max_rows]))
    temporary.rename(output_path)
    return output_path


def write_regenerated_texts(source_path: Path, output_path: Path, target_dir: Path, max_new_tokens: int) -> Path:
    """Replace each training text by the target's greedy continuation of its first tokens, once.

    Drafts trained on the target's own outputs accept more tokens. Both demo drafts read this file,
    so the target generates the data once instead of once per draft.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .edsd.data import regenerate_text

    if output_path.is_file():
        return output_path
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    texts = [json.loads(line)["text"] for line in source_path.read_text().splitlines() if line.strip()]
    rows = regenerate_text(texts, target, tokenizer, max_new_tokens=max_new_tokens)
    temporary = output_path.with_suffix(".tmp")
    temporary.write_text(
        "".join(json.dumps({"text": tokenizer.decode(row["input_ids"], skip_special_tokens=True)}) + "\n" for row in rows)
    )
    temporary.rename(output_path)
    return output_path


def write_heldout_prompts(output_path: Path, num_prompts: int, num_lines: int) -> Path:
    """Write the first `num_lines` non-empty lines of held-out files as Spec-Bench-style `turns` rows."""
    from .recipes.corpus import collect_stdlib_files, read_source

    if output_path.is_file():
        return output_path
    rows = []
    for path in collect_stdlib_files("heldout"):
        lines = [line for line in read_source(path).splitlines() if line.strip()]
        if len(lines) < num_lines:
            continue
        rows.append({"question_id": path.stem, "category": "stdlib-heldout", "turns": ["\n".join(lines[:num_lines]) + "\n"]})
        if len(rows) >= num_prompts:
            break
    if not rows:
        raise ValueError("No held-out stdlib file is long enough to make a prompt.")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return output_path


def train_or_reuse_draft(output_dir: Path, settings: dict, **train_kwargs) -> Path:
    """Train a draft unless `output_dir` contains a finished one trained with the same settings."""
    from .edsd.train_cli import train_draft

    marker = output_dir / FINISHED_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        logger.info("Reusing the draft in %s.", output_dir)
        return output_dir
    train_draft(output_dir=output_dir, **train_kwargs)
    marker.write_text(json.dumps(settings))
    return output_dir


def run_demo(args) -> int:
    import edsd_hf  # noqa: F401  (registers the EDSD integration)

    from .edsd.train_cli import CurriculumSettings
    from .recipes.target import load_or_train_target

    cache_dir = Path(args.cache_dir)
    targets_dir = cache_dir / "targets"
    print(f"[1/5] Target '{args.target_size}' and the stock draft LM (cache: {targets_dir})")
    target_dir = load_or_train_target(args.target_size, targets_dir, seed=args.seed)
    draft_lm_dir = load_or_train_target(args.draft_lm_size, targets_dir, seed=args.seed, tokenizer_dir=target_dir)

    print("[2/5] Draft training data from the training split")
    data_path = write_training_texts(
        cache_dir / "data" / f"stdlib_train_{args.draft_rows}.jsonl", args.draft_rows, lines_per_chunk=30, max_files=None
    )
    if args.regenerate:
        data_path = write_regenerated_texts(
            data_path,
            cache_dir / "data" / f"{target_dir.name}_regenerated_{args.draft_rows}x{args.regenerate_tokens}.jsonl",
            target_dir,
            args.regenerate_tokens,
        )

    print("[3/5] EDSD draft and EAGLE-3-style baseline, same budget")
    common = {
        "target": str(target_dir),
        "data": str(data_path),
        "draft_vocab_size": args.draft_vocab_size,
        "max_steps": args.draft_steps,
        "per_device_train_batch_size": args.draft_batch_size,
        "learning_rate": args.draft_learning_rate,
        "warmup_steps": max(1, args.draft_steps // 20),
        "seed": args.seed,
        "measure_prompts": 8,
    }
    settings = {k: str(v) for k, v in common.items()}
    drafts_dir = cache_dir / "drafts" / target_dir.name
    edsd_dir = train_or_reuse_draft(
        drafts_dir / "edsd", {**settings, "fusion": "edfuse"}, fusion="edfuse", curriculum=CurriculumSettings(pacing="step"), **common
    )
    eagle_dir = train_or_reuse_draft(
        drafts_dir / "eagle3", {**settings, "fusion": "concat"}, fusion="concat", curriculum=CurriculumSettings(baseline=True), **common
    )

    print("[4/5] Prompts from held-out files")
    prompts_path = args.prompts or write_heldout_prompts(
        cache_dir / "data" / f"heldout_prompts_{args.max_prompts}x{args.prompt_lines}.jsonl", args.max_prompts, args.prompt_lines
    )

    print("[5/5] Benchmark against plain generate()")
    from .bench_cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    bench_args = parser.parse_args(
        [
            "bench",
            "--target", str(target_dir),
            "--assistant", f"stock-draft-lm={draft_lm_dir}",
            "--prompt-lookup",
            "--edsd-draft", f"eagle3-style={eagle_dir}",
            "--edsd-draft", f"edsd={edsd_dir}",
            "--prompts", str(prompts_path),
            "--max-prompts", str(args.max_prompts),
            "--max-new-tokens", str(args.max_new_tokens),
            "--repeats", str(args.repeats),
            "--no-chat-template",
            "--output", str(cache_dir / "bench" / target_dir.name),
        ]
    )
    return bench_args.func(bench_args)


def add_subcommands(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Train a target on stdlib source, train EDSD and baseline drafts, and benchmark them (cached).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="Where models, data and reports are kept (default: $EDSD_HF_HOME or ~/.cache/edsd_hf).")
    parser.add_argument("--target-size", default="small", help="Target recipe size: tiny, small or bench.")
    parser.add_argument("--draft-lm-size", default="draft-lm", help="Recipe size of the stock assisted-generation draft LM.")
    parser.add_argument("--draft-rows", type=int, default=4000, help="Training rows (30-line source chunks) for the drafts.")
    parser.add_argument("--draft-steps", type=int, default=1500, help="Optimizer steps per draft.")
    parser.add_argument("--draft-batch-size", type=int, default=8, help="Sequences per draft training step.")
    parser.add_argument("--draft-learning-rate", type=float, default=1e-3, help="Peak learning rate of draft training.")
    parser.add_argument("--draft-vocab-size", type=int, default=2048, help="Tokens in the draft vocabulary.")
    parser.add_argument("--regenerate", action=argparse.BooleanOptionalAction, default=True,
                        help="Train drafts on the target's own continuations of the training texts.")
    parser.add_argument("--regenerate-tokens", type=int, default=128, help="Tokens the target writes per training row.")
    parser.add_argument("--prompts", default=None,
                        help="Prompt file for the benchmark (default: first lines of held-out stdlib files).")
    parser.add_argument("--max-prompts", type=int, default=20, help="Prompts in the benchmark.")
    parser.add_argument("--prompt-lines", type=int, default=12, help="Non-empty source lines per held-out prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens generated per prompt.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per prompt and method.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every training stage.")
    parser.set_defaults(func=run_demo)
