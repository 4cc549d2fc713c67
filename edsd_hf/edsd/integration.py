"""Route `generate(assistant_model=<EDSD draft>)` to the EDSD candidate generator.

transformers has no public argument for a custom candidate generator: assisted decoding calls the
private `GenerationMixin._get_candidate_generator` for one. This module wraps that method once,
at `import edsd_hf`. The wrapper returns an `EdsdCandidateGenerator` when the assistant is an
`EdsdDraftModel` and calls the original method for every other assistant, so stock assisted
generation, prompt lookup and the other built-in generators behave exactly as before.

The wrapper relies on the loop passing the target's forward outputs to generators that set
`requires_model_outputs` and merging their `model_kwargs_overrides` into the target's inputs.
That contract is private, so it is checked against the installed version at import.
"""

import inspect

import transformers
from packaging import version
from transformers import GenerationMixin
from transformers.utils import logging

from .candidate_generator import EdsdCandidateGenerator
from .modeling_edsd import EdsdDraftModel


logger = logging.get_logger(__name__)

# transformers releases this integration was tested on: [minimum, maximum-exclusive).
TESTED_TRANSFORMERS_RANGE = ("5.25.0", "5.26.0")

_PATCH_MARKER = "_edsd_hf_wrapped"


def is_tested_transformers_version(installed: str = transformers.__version__) -> bool:
    low, high = (version.parse(v) for v in TESTED_TRANSFORMERS_RANGE)
    return low <= version.parse(installed) < high


def find_integration_problem() -> str | None:
    """Describe why the installed transformers cannot host the EDSD generator, or return None."""
    original = getattr(GenerationMixin, "_get_candidate_generator", None)
    if original is None:
        return "GenerationMixin._get_candidate_generator does not exist"
    parameters = inspect.signature(original).parameters
    for name in ("generation_config", "input_ids", "logits_processor", "assistant_model", "target_tokenizer"):
        if name not in parameters:
            return f"GenerationMixin._get_candidate_generator has no `{name}` parameter"
    loop_source = inspect.getsource(GenerationMixin._assisted_decoding)
    for marker in ("requires_model_outputs", "model_kwargs_overrides", "n_last_matches"):
        if marker not in loop_source:
            return f"the assisted-decoding loop no longer uses `{marker}`"
    return None


def install_generation_integration() -> bool:
    """Wrap `_get_candidate_generator` so EDSD drafts get their generator. Safe to call repeatedly.

    Returns whether the wrapper is installed. Outside the tested transformers range it is installed
    with a warning when the private contract still looks intact. Otherwise it is skipped, and an
    EDSD draft then raises from `generate()` instead of drafting wrongly.
    """
    original = getattr(GenerationMixin, "_get_candidate_generator", None)
    if original is not None and getattr(original, _PATCH_MARKER, False):
        return True

    supported = f">={TESTED_TRANSFORMERS_RANGE[0]},<{TESTED_TRANSFORMERS_RANGE[1]}"
    problem = find_integration_problem()
    if problem is not None:
        logger.warning(
            "edsd-hf cannot hook EDSD drafts into generate() on transformers %s: %s. Install transformers%s.",
            transformers.__version__,
            problem,
            supported,
        )
        return False
    if not is_tested_transformers_version():
        logger.warning(
            "edsd-hf was tested with transformers%s, found %s. EDSD drafting relies on private generation code; "
            "check that greedy outputs with and without the draft still match.",
            supported,
            transformers.__version__,
        )

    def _get_candidate_generator(
        self,
        generation_config,
        input_ids,
        inputs_tensor,
        logits_processor,
        model_kwargs,
        assistant_model=None,
        target_tokenizer=None,
        assistant_tokenizer=None,
    ):
        if isinstance(assistant_model, EdsdDraftModel):
            return EdsdCandidateGenerator(
                draft=assistant_model,
                target=self,
                input_ids=input_ids,
                generation_config=generation_config,
                logits_processor=logits_processor,
                tokenizer=target_tokenizer,
            )
        return original(
            self,
            generation_config=generation_config,
            input_ids=input_ids,
            inputs_tensor=inputs_tensor,
            logits_processor=logits_processor,
            model_kwargs=model_kwargs,
            assistant_model=assistant_model,
            target_tokenizer=target_tokenizer,
            assistant_tokenizer=assistant_tokenizer,
        )

    setattr(_get_candidate_generator, _PATCH_MARKER, True)
    _get_candidate_generator.__wrapped__ = original
    _get_candidate_generator.__doc__ = original.__doc__
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    return True
