from transformers import AutoConfig, AutoModel

from .cache import EdsdDraftCache
from .configuration_edsd import EdsdConfig, default_target_layer_ids
from .modeling_edsd import EdsdDraftModel, EdsdDraftOutput


AutoConfig.register(EdsdConfig.model_type, EdsdConfig, exist_ok=True)
AutoModel.register(EdsdConfig, EdsdDraftModel, exist_ok=True)

__all__ = ["EdsdConfig", "EdsdDraftCache", "EdsdDraftModel", "EdsdDraftOutput", "default_target_layer_ids"]
