"""Per-layer sensitivity of an MoE model to a reduced top-k, and a schedule proposed from it."""

import math

import datasets
from transformers.utils import logging

from .evaluation import evaluate_language_modeling
from .modeling_hookmoe import HookMoEForCausalLM


logger = logging.get_logger(__name__)


def layer_sensitivity(
    model: HookMoEForCausalLM,
    eval_dataset: datasets.Dataset,
    reduced_ks: list[int] | None = None,
    batch_size: int = 8,
) -> dict:
    """Measure the quality change when only one MoE layer routes with a reduced k.

    Every other layer keeps the original k and hooks are bypassed. `reduced_ks` defaults to every k from 1 to
    the original k minus 1. Returns `{"original_top_k", "baseline": metrics, "layers": [...]}` where each layer
    entry contains `layer`, `k`, `loss`, `perplexity`, `accuracy` and `perplexity_increase` (relative to the
    baseline).
    """
    original_k = model.config.original_top_k
    if reduced_ks is None:
        reduced_ks = list(range(1, original_k))
    invalid = [k for k in reduced_ks if not 1 <= k < original_k]
    if invalid or not reduced_ks:
        raise ValueError(
            f"reduced_ks={reduced_ks} must be non-empty and hold values between 1 and original_top_k - 1 "
            f"({original_k - 1})."
        )

    full_schedule = [original_k if i in model.config.moe_layers else None for i in range(len(model.top_k_per_layer))]
    with model.disable_hooks(), model.routing_schedule(full_schedule):
        baseline = evaluate_language_modeling(model, eval_dataset, batch_size, "Baseline (full k)")

    entries = []
    for layer in model.config.moe_layers:
        for k in sorted(set(reduced_ks), reverse=True):
            schedule = list(full_schedule)
            schedule[layer] = k
            with model.disable_hooks(), model.routing_schedule(schedule):
                metrics = evaluate_language_modeling(model, eval_dataset, batch_size, f"Layer {layer} at k={k}")
            metrics.update(layer=layer, k=k, perplexity_increase=metrics["perplexity"] / baseline["perplexity"] - 1.0)
            entries.append(metrics)
    return {"original_top_k": original_k, "baseline": baseline, "layers": entries}


def propose_schedule(sensitivity: dict, num_layers: int, target_reduction: float = 0.5) -> list[int | None]:
    """Propose one k per decoder layer that removes `target_reduction` of the routed experts at least cost.

    Treats the per-layer losses as additive and lowers k greedily. Each step moves one layer to its next measured
    lower k, choosing the move with the smallest loss increase per expert saved. Steps continue until the mean k
    over MoE layers is at most `original_k * (1 - target_reduction)`. Layers without a router get `None`. If the measured
    ks cannot reach the target, the schedule with every layer at its lowest measured k is returned with a warning.
    """
    if not 0 < target_reduction < 1:
        raise ValueError(f"target_reduction must be between 0 and 1 (exclusive), got {target_reduction}.")
    original_k = sensitivity["original_top_k"]
    baseline_loss = sensitivity["baseline"]["loss"]
    loss_at: dict[int, dict[int, float]] = {}
    for entry in sensitivity["layers"]:
        loss_at.setdefault(entry["layer"], {original_k: baseline_loss})[entry["k"]] = entry["loss"]

    current = {layer: original_k for layer in loss_at}
    budget = original_k * (1.0 - target_reduction) * len(current)
    while sum(current.values()) > budget + 1e-9:
        best = None
        for layer, k in current.items():
            lower = [candidate for candidate in loss_at[layer] if candidate < k]
            if not lower:
                continue
            next_k = max(lower)
            cost = (loss_at[layer][next_k] - loss_at[layer][k]) / (k - next_k)
            # Ties go to the upper layer, the usual finding for MoE models.
            if best is None or cost < best[0] or (math.isclose(cost, best[0]) and layer > best[1]):
                best = (cost, layer, next_k)
        if best is None:
            logger.warning(
                f"The measured ks cannot remove {target_reduction:.0%} of the routed experts; returning every layer "
                "at its lowest measured k."
            )
            break
        current[best[1]] = best[2]
    return [current.get(i) for i in range(num_layers)]


def depth_trend(sensitivity: dict) -> dict[str, float]:
    """Summarise how sensitivity changes with depth, at the lowest measured k.

    Returns the Spearman rank correlation between layer index and perplexity increase (negative when upper
    layers are less sensitive) and the mean perplexity increase of the lower and upper halves of the MoE layers.
    """
    lowest_k = min(entry["k"] for entry in sensitivity["layers"])
    entries = sorted((e for e in sensitivity["layers"] if e["k"] == lowest_k), key=lambda e: e["layer"])
    increases = [entry["perplexity_increase"] for entry in entries]
    half = len(entries) // 2
    lower, upper = increases[:half], increases[len(entries) - half :]
    return {
        "k": lowest_k,
        "spearman_layer_vs_increase": _spearman(list(range(len(entries))), increases),
        "lower_half_mean_increase": sum(lower) / len(lower) if lower else float("nan"),
        "upper_half_mean_increase": sum(upper) / len(upper) if upper else float("nan"),
    }


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    position = 0
    while position < len(order):
        end = position
        while end + 1 < len(order) and values[order[end + 1]] == values[order[position]]:
            end += 1
        # Tied values share the mean of their ranks.
        for i in range(position, end + 1):
            ranks[order[i]] = (position + end) / 2.0
        position = end + 1
    return ranks


def _spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 2:
        return float("nan")
    rank_x, rank_y = _ranks(x), _ranks(y)
    mean_x, mean_y = sum(rank_x) / len(rank_x), sum(rank_y) / len(rank_y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(rank_x, rank_y))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in rank_x) * sum((b - mean_y) ** 2 for b in rank_y))
    return covariance / spread if spread > 0 else float("nan")


def format_sensitivity_table(sensitivity: dict) -> str:
    """Format `layer_sensitivity` results as a plain-text table, one row per layer and k."""
    baseline = sensitivity["baseline"]
    lines = [
        f"baseline (k={sensitivity['original_top_k']} everywhere): perplexity {baseline['perplexity']:.4f}, "
        f"accuracy {baseline['accuracy']:.4f}",
        f"{'layer':>5} {'k':>3} {'perplexity':>11} {'change':>9} {'accuracy':>9}",
    ]
    for entry in sensitivity["layers"]:
        lines.append(
            f"{entry['layer']:>5} {entry['k']:>3} {entry['perplexity']:>11.4f} {entry['perplexity_increase']:>+9.2%} "
            f"{entry['accuracy']:>9.4f}"
        )
    return "\n".join(lines)


def plot_sensitivity(sensitivity: dict, path: str) -> None:
    """Save a bar chart of the perplexity increase per layer (one bar group per measured k) to `path`."""
    # Imported here with the file-only backend: plotting is optional and must work without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({entry["k"] for entry in sensitivity["layers"]})
    layers = sorted({entry["layer"] for entry in sensitivity["layers"]})
    width = 0.8 / len(ks)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(layers) + 2), 4))
    for offset, k in enumerate(ks):
        increases = {e["layer"]: 100 * e["perplexity_increase"] for e in sensitivity["layers"] if e["k"] == k}
        positions = [i + (offset - (len(ks) - 1) / 2) * width for i in range(len(layers))]
        axes.bar(positions, [increases[layer] for layer in layers], width=width, label=f"k={k}")
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("decoder layer (only this layer at reduced k)")
    axes.set_ylabel("held-out perplexity increase (%)")
    axes.set_title(f"Per-layer sensitivity to top-k (original k={sensitivity['original_top_k']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
