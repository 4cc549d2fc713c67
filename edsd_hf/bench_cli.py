"""`edsd-hf bench`: compare decoding methods on one target, side by side."""

import argparse
import json
import os
import platform
from datetime import datetime, timezone

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from .bench import BenchMethod, format_table, load_prompts, run_benchmark, save_report


def parse_named_path(value: str) -> tuple[str, str]:
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"Expected NAME=PATH, got {value!r}.")
    return name, path


def add_subcommands(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Measure tau, tokens/s and speedup of speculative decoding methods against plain generate().",
        description="Runs plain decoding and each given method on the same prompts in one process.",
    )
    parser.add_argument("--target", required=True, help="Target checkpoint (path or Hub id) with its tokenizer.")
    parser.add_argument("--edsd-draft", action="append", default=[], type=parse_named_path, metavar="NAME=PATH",
                        help="An EDSD draft (fusion edfuse or concat) to benchmark; repeatable.")
    parser.add_argument("--assistant", action="append", default=[], type=parse_named_path, metavar="NAME=PATH",
                        help="A standalone draft LM for HF's stock assisted generation; repeatable.")
    parser.add_argument("--prompt-lookup", action="store_true", help="Include prompt-lookup decoding.")
    parser.add_argument("--num-assistant-tokens", type=int, nargs="+", default=None, metavar="K",
                        help="Tokens each EDSD draft proposes per round (default: the draft's generation_config). "
                             "Several values benchmark every EDSD draft once per value, named NAME@K.")
    parser.add_argument("--prompts", required=True,
                        help="JSONL (Spec-Bench `turns`, or `prompt`/`text`), a text file with one prompt a line, "
                             "or 'humaneval'.")
    parser.add_argument("--max-prompts", type=int, default=None, help="Use only the first N prompts.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens generated per prompt.")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0],
                        help="Sampling temperatures; 0 means greedy.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per prompt and method; the median is used.")
    parser.add_argument("--no-chat-template", action="store_true", help="Encode prompts as plain text.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", required=True, help="Folder for bench.json and bench.png.")
    parser.set_defaults(func=run_bench_command)


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"


def run_bench_command(args) -> int:
    import edsd_hf  # noqa: F401  (registers the EDSD integration)

    # Checked before any model is loaded, so that a typo fails at once.
    invalid_lengths = [k for k in args.num_assistant_tokens or [] if k < 1]
    if invalid_lengths:
        raise ValueError(f"Invalid --num-assistant-tokens {invalid_lengths}: every draft length must be at least 1.")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()

    methods = [BenchMethod("plain", "plain")]
    for name, path in args.assistant:
        assistant = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        methods.append(BenchMethod(name, "assisted", assistant))
    if args.prompt_lookup:
        methods.append(BenchMethod("prompt-lookup", "prompt_lookup"))
    for name, path in args.edsd_draft:
        draft = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        if args.num_assistant_tokens is None:
            methods.append(BenchMethod(name, "edsd", draft))
            continue
        for num_tokens in args.num_assistant_tokens:
            method_name = name if len(args.num_assistant_tokens) == 1 else f"{name}@{num_tokens}"
            methods.append(BenchMethod(method_name, "edsd", draft, {"num_assistant_tokens": num_tokens}))

    prompts = load_prompts(args.prompts, args.max_prompts)
    results = run_benchmark(
        target, tokenizer, methods, prompts,
        max_new_tokens=args.max_new_tokens,
        temperatures=tuple(args.temperatures),
        repeats=args.repeats,
        use_chat_template=not args.no_chat_template,
    )
    metadata = {
        "target": args.target,
        "methods": {m.name: m.kind for m in methods},
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "num_assistant_tokens": args.num_assistant_tokens,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    report = save_report(results, args.output, metadata)
    print(format_table(report["overall"]))
    print(f"\nWrote {args.output}/bench.json and {args.output}/bench.png")
    print(json.dumps(metadata, indent=2))
    return 0
