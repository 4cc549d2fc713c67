"""edsd-hf: EDSD speculative-decoding drafts and HookMoE reduced-top-k MoE models for transformers.

Importing the package registers the model classes with the Auto classes and lets
`target.generate(..., assistant_model=draft)` pick the EDSD candidate generator for EDSD drafts.
"""

from .edsd import EdsdConfig, EdsdCurriculumCallback, EdsdDraftModel, EdsdTrainer
from .hookmoe import HookMoEConfig, HookMoEForCausalLM, HookMoETrainer

__version__ = "0.1.0"

__all__ = ["EdsdConfig", "EdsdCurriculumCallback", "EdsdDraftModel", "EdsdTrainer", "HookMoEConfig", "HookMoEForCausalLM", "HookMoETrainer", "__version__"]
