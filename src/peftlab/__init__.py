"""peftlab: parameter-efficient tuning beyond plain LoRA, on any Hugging Face causal LM."""

__version__ = "0.2.0"

from peftlab.adapters import Loaded, attach, load, load_for_inference, save  # noqa: E402
from peftlab.data import PromptFormat, load_records  # noqa: E402
from peftlab.generation import generate  # noqa: E402
from peftlab.models import DEFAULT_MODEL, load_model, tiny_model  # noqa: E402
from peftlab.module import read, read_info, write  # noqa: E402
from peftlab.training import DataConfig, TrainConfig, train  # noqa: E402

__all__ = ["DEFAULT_MODEL", "DataConfig", "Loaded", "PromptFormat", "TrainConfig", "attach", "generate", "load",
           "load_for_inference", "load_model", "load_records", "read", "read_info", "save", "tiny_model", "train",
           "write"]
