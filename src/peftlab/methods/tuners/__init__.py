"""peft's other tuners, each one peft adapter in a plain peft folder: LoHa, LoKr, VeRA, OFT and AdaLoRA.

One generic method (``PeftTunerMethod``) over peft's tuners; a tuner is a config (its fields and their peft names)
and a Method subclass (its name and why module arithmetic refuses it). AdaLoRA adds its rank schedule as a Trainer
callback (``PeftlabModel.training_callbacks``).
"""

from peftlab.methods import register_method
from peftlab.methods.tuners.config import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    PeftTunerConfig,
    VeraConfig,
)
from peftlab.methods.tuners.model import (
    AdaLoraMethod,
    LoHaMethod,
    LoKrMethod,
    OFTMethod,
    PeftTunerMethod,
    VeraMethod,
)

for _method in (LoHaMethod(), LoKrMethod(), VeraMethod(), OFTMethod(), AdaLoraMethod()):
    register_method(_method)

__all__ = ["AdaLoraConfig", "AdaLoraMethod", "LoHaConfig", "LoHaMethod", "LoKrConfig", "LoKrMethod", "OFTConfig",
           "OFTMethod", "PeftTunerConfig", "PeftTunerMethod", "VeraConfig", "VeraMethod"]
