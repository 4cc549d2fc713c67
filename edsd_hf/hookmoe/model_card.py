"""Model card (README.md) for a saved HookMoE checkpoint, rendered from `model_cards/hookmoe_template.md`."""

import string
from pathlib import Path

from .evaluation import format_report
from .modeling_hookmoe import HookMoEForCausalLM


# The template lives in the repository's `model_cards/` folder, two levels above this package.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "hookmoe_template.md"


def render_model_card(
    model: HookMoEForCausalLM,
    model_id: str,
    calibration: str = "Not recorded.",
    evaluation: dict | None = None,
    template_path: str | Path | None = None,
) -> str:
    """Fill the model-card template with the model's config, a calibration summary and evaluation results.

    `evaluation` is the dict returned by `evaluate_hookmoe`, rendered as a plain-text table. Placeholders
    the template uses but this function does not fill are left as they are.
    """
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template_path.is_file():
        # NOTE: the default template ships in the source tree but not in the wheel, so installed copies need template_path.
        raise FileNotFoundError(
            f"Model card template not found: {template_path}. Pass template_path, or run from a source checkout."
        )
    config = model.config
    values = {
        "model_id": model_id,
        "base_model": config.base_model_name_or_path or "unknown",
        "base_model_type": config.text_config.model_type,
        "original_top_k": config.original_top_k,
        "num_experts": config.num_experts,
        "top_k_schedule": config.top_k_schedule,
        "top_k_per_layer": config.top_k_per_layer,
        "active_experts": f"{config.active_experts_per_token:.2f}",
        "active_experts_change": f"{-config.active_experts_reduction:+.1%}",
        "hook_layers": config.hook_layers,
        "hook_rank": config.hook_rank,
        "hook_activation": config.hook_activation,
        "hook_input_norm": config.hook_input_norm,
        "hook_parameters": f"{sum(p.numel() for p in model.hooks.parameters()):,}",
        "calibration": calibration,
        "evaluation": f"```\n{format_report(evaluation)}\n```" if evaluation else "Not evaluated.",
    }
    return string.Template(template_path.read_text(encoding="utf-8")).safe_substitute(values)


def write_model_card(output_dir: str | Path, model: HookMoEForCausalLM, **kwargs) -> Path:
    """Render the model card into `output_dir/README.md`, passing `kwargs` to `render_model_card`."""
    output_dir = Path(output_dir)
    kwargs.setdefault("model_id", str(output_dir))
    path = output_dir / "README.md"
    path.write_text(render_model_card(model, **kwargs), encoding="utf-8")
    return path
