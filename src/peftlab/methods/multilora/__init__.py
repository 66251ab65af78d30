"""MultiLoRA: many LoRAs trained and served in one batch, one adapter per example."""

from peftlab.methods import register_method
from peftlab.methods.multilora.config import MultiLoraConfig
from peftlab.methods.multilora.layer import MultiLoraLinear, lora_delta
from peftlab.methods.multilora.model import MultiLoraMethod, MultiLoraModel

register_method(MultiLoraMethod())

__all__ = ["MultiLoraConfig", "MultiLoraLinear", "MultiLoraMethod", "MultiLoraModel", "lora_delta"]
