from transformers import AutoConfig, AutoModel

from .cache import EdsdDraftCache
from .candidate_generator import EdsdCandidateGenerator, SpeculationStats
from .configuration_edsd import SUPPORTED_TARGET_MODEL_TYPES, EdsdConfig, default_target_layer_ids
from .curriculum import EdsdCurriculumCallback
from .integration import TESTED_TRANSFORMERS_RANGE, install_generation_integration
from .modeling_edsd import EdsdDraftModel, EdsdDraftOutput
from .trainer import EdsdTrainer


AutoConfig.register(EdsdConfig.model_type, EdsdConfig, exist_ok=True)
AutoModel.register(EdsdConfig, EdsdDraftModel, exist_ok=True)
install_generation_integration()

__all__ = [
    "SUPPORTED_TARGET_MODEL_TYPES",
    "TESTED_TRANSFORMERS_RANGE",
    "EdsdCandidateGenerator",
    "EdsdConfig",
    "EdsdCurriculumCallback",
    "EdsdDraftCache",
    "EdsdDraftModel",
    "EdsdDraftOutput",
    "EdsdTrainer",
    "SpeculationStats",
    "default_target_layer_ids",
    "install_generation_integration",
]
