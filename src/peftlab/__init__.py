"""peftlab: parameter-efficient tuning beyond plain LoRA, on any Hugging Face causal LM."""

__version__ = "0.1.0"

from peftlab.data import PromptFormat, load_records  # noqa: E402
from peftlab.generation import generate  # noqa: E402
from peftlab.models import DEFAULT_MODEL, load_model, tiny_model  # noqa: E402
from peftlab.module import attach, load, load_with_base, read_info, save  # noqa: E402
from peftlab.training import DataConfig, TrainConfig, train  # noqa: E402

__all__ = ["DEFAULT_MODEL", "DataConfig", "PromptFormat", "TrainConfig", "attach", "generate", "load",
           "load_model", "load_records", "load_with_base", "read_info", "save", "tiny_model", "train"]
