"""LoRA (optionally DoRA, rsLoRA) and IA3 through ``peft``; a saved adapter is a plain peft folder."""

from peftlab.methods import register_method
from peftlab.methods.lora.config import IA3Config, LoraConfig
from peftlab.methods.lora.model import (
    IA3Method,
    LoraMethod,
    PeftAdapterModel,
    get_peft_model,
    read_peft_folder,
    write_peft_folder,
)

register_method(LoraMethod())
register_method(IA3Method())

__all__ = ["IA3Config", "IA3Method", "LoraConfig", "LoraMethod", "PeftAdapterModel", "get_peft_model",
           "read_peft_folder", "write_peft_folder"]
