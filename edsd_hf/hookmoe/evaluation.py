"""Evaluation of HookMoE: quality and speed at full k, reduced k, and reduced k with hooks, in one run."""

import contextlib
import statistics
import time

import datasets
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .modeling_hookmoe import HookMoEForCausalLM


logger = logging.get_logger(__name__)

# The three settings compared by `evaluate_hookmoe`, in report order.
SETTINGS = ("full_k", "reduced_k", "reduced_k_hooks")

# Targets of the HookMoE method. At least half of the routed expert evaluations are removed and prefill is at
# least 1.42x as fast as full k. With hooks, held-out perplexity is within 2.5% of full k, and the hooks close at
# least 75% of the perplexity gap that the reduced top-k opens.
TARGETS = {
    "active_experts_reduction": 0.5,
    "prefill_speedup": 1.42,
    "max_perplexity_increase": 0.025,
    "min_gap_closed": 0.75,
}


def setting_context(model: HookMoEForCausalLM, setting: str) -> contextlib.AbstractContextManager:
    """Return the context that runs `model` as `full_k` (the base), `reduced_k` (no hooks) or `reduced_k_hooks`."""
    if setting == "full_k":
        return model.disable_hookmoe()
    if setting == "reduced_k":
        return model.disable_hooks()
    if setting == "reduced_k_hooks":
        return contextlib.nullcontext(model)
    raise ValueError(f"Unknown setting {setting!r}: expected one of {SETTINGS}.")


@torch.no_grad()
def evaluate_language_modeling(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    batch_size: int = 8,
    description: str = "Evaluating",
) -> dict[str, float]:
    """Compute next-token loss, perplexity and top-1 accuracy on causal-LM blocks.

    `dataset` rows contain `input_ids` and optionally `labels` (-100 marks ignored targets). Position t is scored
    on label t+1, as in the causal-LM loss. Returns `loss` (mean negative log-likelihood in nats per token),
    `perplexity` (`exp(loss)`), `accuracy` and `num_tokens`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_correct = 0
    total_tokens = 0
    columns = ["input_ids", "labels"] if "labels" in dataset.column_names else ["input_ids"]
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=description, unit="batch", leave=False):
            batch = dataset[start : start + batch_size]
            input_ids = torch.tensor(batch["input_ids"], device=device)
            labels = torch.tensor(batch["labels"], device=device) if "labels" in columns else input_ids
            logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
            counted = targets != -100
            nll = torch.nn.functional.cross_entropy(logits[counted], targets[counted], reduction="sum")
            total_nll += nll.item()
            total_correct += (logits.argmax(dim=-1)[counted] == targets[counted]).sum().item()
            total_tokens += counted.sum().item()
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("The evaluation data has no counted target tokens (every label is -100 or blocks are too short).")
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": float(torch.exp(torch.tensor(loss))),
        "accuracy": total_correct / total_tokens,
        "num_tokens": total_tokens,
    }


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def measure_speed(
    model: HookMoEForCausalLM,
    prompts: torch.Tensor,
    new_tokens: int = 32,
    repeats: int = 5,
    settings: tuple[str, ...] = SETTINGS,
) -> dict[str, dict[str, float]]:
    """Time prefill and decode of each setting side by side and return medians and speedups against `full_k`.

    Prefill is one forward over `prompts` (`[batch, prompt_len]`) that fills a KV cache. Decode time per token is
    `(t(generate new_tokens) - t(generate 1 token)) / (new_tokens - 1)` with greedy decoding and EOS disabled, so
    every run produces the same number of tokens. Each repeat runs every setting once, starting with a different
    setting each time, so that drift of the machine's speed during the run affects all settings alike.
    """
    if "full_k" not in settings:
        raise ValueError(f"Speed is reported relative to 'full_k', which is missing from settings={settings}.")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to separate decode time from prefill, got {new_tokens}.")
    was_training = model.training
    model.eval()
    prompts = prompts.to(next(model.parameters()).device)
    attention_mask = torch.ones_like(prompts)
    generation_kwargs = {
        "attention_mask": attention_mask,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": 0,
    }

    def prefill():
        model(input_ids=prompts, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)

    def generate(count):
        return lambda: model.generate(prompts, max_new_tokens=count, min_new_tokens=count, **generation_kwargs)

    prefill_times = {setting: [] for setting in settings}
    decode_times = {setting: [] for setting in settings}
    try:
        # One untimed pass per setting loads kernels and allocator pools before timing starts.
        for setting in settings:
            with setting_context(model, setting):
                prefill()
                generate(2)()
        for repeat in tqdm(range(repeats), desc="Timing", unit="repeat", leave=False):
            shift = repeat % len(settings)
            for setting in settings[shift:] + settings[:shift]:
                with setting_context(model, setting):
                    prefill_times[setting].append(_timed(prefill))
                    one_token = _timed(generate(1))
                    all_tokens = _timed(generate(new_tokens))
                    decode_times[setting].append(max(all_tokens - one_token, 0.0) / (new_tokens - 1))
    finally:
        model.train(was_training)

    result = {}
    for setting in settings:
        prefill_seconds = statistics.median(prefill_times[setting])
        decode_seconds = statistics.median(decode_times[setting])
        result[setting] = {"prefill_seconds": prefill_seconds, "decode_seconds_per_token": decode_seconds}
    for setting in settings:
        result[setting]["prefill_speedup"] = result["full_k"]["prefill_seconds"] / result[setting]["prefill_seconds"]
        decode = result[setting]["decode_seconds_per_token"]
        result[setting]["decode_speedup"] = result["full_k"]["decode_seconds_per_token"] / decode if decode > 0 else float("nan")
    return result


def evaluate_hookmoe(
    model: HookMoEForCausalLM,
    eval_dataset: datasets.Dataset,
    batch_size: int = 8,
    speed_prompts: torch.Tensor | None = None,
    new_tokens: int = 32,
    repeats: int = 5,
) -> dict:
    """Compare full k, reduced k and reduced k with hooks on held-out data, and optionally on speed.

    Returns a dict with the quality metrics of each setting and their relative perplexity increase against full
    k. It also contains the share of the perplexity gap the hooks close, the active experts per token, the speed
    measurements when `speed_prompts` is given, and which of the method's targets (`TARGETS`) are met.
    """
    settings = SETTINGS if model.config.hook_layers else SETTINGS[:2]
    results: dict = {"settings": {}}
    for setting in settings:
        with setting_context(model, setting):
            results["settings"][setting] = evaluate_language_modeling(model, eval_dataset, batch_size, setting)

    full = results["settings"]["full_k"]["perplexity"]
    for setting in settings:
        results["settings"][setting]["perplexity_increase"] = results["settings"][setting]["perplexity"] / full - 1.0
    reduced = results["settings"]["reduced_k"]["perplexity"]
    if "reduced_k_hooks" in results["settings"]:
        hooked = results["settings"]["reduced_k_hooks"]["perplexity"]
        # With no gap there is nothing to close, so report None rather than divide by zero.
        results["gap_closed"] = (reduced - hooked) / (reduced - full) if reduced != full else None

    original_k = model.config.original_top_k
    results["active_experts_per_token"] = {
        "full_k": float(original_k),
        "reduced_k": model.active_experts_per_token,
        "reduction": 1.0 - model.active_experts_per_token / original_k,
    }
    if speed_prompts is not None:
        results["speed"] = measure_speed(model, speed_prompts, new_tokens, repeats, settings)
        results["speed_setup"] = {
            "batch_size": int(speed_prompts.shape[0]),
            "prompt_len": int(speed_prompts.shape[1]),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        }
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict) -> dict[str, bool | None]:
    """Report which HookMoE targets the results meet (`None` where the needed measurement is missing)."""
    final = "reduced_k_hooks" if "reduced_k_hooks" in results["settings"] else "reduced_k"
    targets: dict[str, bool | None] = {
        "active_experts_reduction": results["active_experts_per_token"]["reduction"]
        >= TARGETS["active_experts_reduction"] - 1e-9,
        "perplexity_within_2.5%": results["settings"][final]["perplexity_increase"] <= TARGETS["max_perplexity_increase"],
        "gap_closed_75%": None,
        "prefill_speedup_1.42x": None,
    }
    if results.get("gap_closed") is not None:
        targets["gap_closed_75%"] = results["gap_closed"] >= TARGETS["min_gap_closed"]
    if "speed" in results:
        targets["prefill_speedup_1.42x"] = results["speed"][final]["prefill_speedup"] >= TARGETS["prefill_speedup"]
    return targets


def format_report(results: dict) -> str:
    """Format `evaluate_hookmoe` results as a plain-text table."""
    lines = [f"{'setting':<17} {'perplexity':>11} {'vs full k':>10} {'accuracy':>9}"]
    for setting, metrics in results["settings"].items():
        lines.append(
            f"{setting:<17} {metrics['perplexity']:>11.4f} {metrics['perplexity_increase']:>+10.2%} "
            f"{metrics['accuracy']:>9.4f}"
        )
    experts = results["active_experts_per_token"]
    lines.append(
        f"active routed experts per token: {experts['full_k']:.2f} -> {experts['reduced_k']:.2f} "
        f"({-experts['reduction']:+.1%})"
    )
    if results.get("gap_closed") is not None:
        lines.append(f"perplexity gap closed by hooks: {results['gap_closed']:.1%}")
    if "speed" in results:
        lines.append(f"{'setting':<17} {'prefill s':>10} {'speedup':>8} {'decode s/tok':>13} {'speedup':>8}")
        for setting, speed in results["speed"].items():
            lines.append(
                f"{setting:<17} {speed['prefill_seconds']:>10.4f} {speed['prefill_speedup']:>7.2f}x "
                f"{speed['decode_seconds_per_token']:>13.5f} {speed['decode_speedup']:>7.2f}x"
            )
    targets = ", ".join(f"{name}: {'n/a' if met is None else ('met' if met else 'missed')}" for name, met in results["targets"].items())
    lines.append(f"targets: {targets}")
    return "\n".join(lines)
