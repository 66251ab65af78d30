"""peft's other tuners, each one peft adapter in a plain peft folder: LoHa, LoKr, VeRA and OFT.

One generic method (``PeftTunerMethod``) over peft's tuners; a tuner is a config (its fields and their peft names)
and a Method subclass (its name and why module arithmetic refuses it). AdaLoRA is not here: its rank schedule needs a
call between the optimizer step and zeroing the gradients at every training step (see docs/tuners.md).
"""

from peftlab.methods import register_method
from peftlab.methods.tuners.config import LoHaConfig, LoKrConfig, OFTConfig, PeftTunerConfig, VeraConfig
from peftlab.methods.tuners.model import LoHaMethod, LoKrMethod, OFTMethod, PeftTunerMethod, VeraMethod

for _method in (LoHaMethod(), LoKrMethod(), VeraMethod(), OFTMethod()):
    register_method(_method)

__all__ = ["LoHaConfig", "LoHaMethod", "LoKrConfig", "LoKrMethod", "OFTConfig", "OFTMethod", "PeftTunerConfig",
           "PeftTunerMethod", "VeraConfig", "VeraMethod"]
