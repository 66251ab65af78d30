"""Bitune (Kopiczko et al., 2024): the prompt read causally and bidirectionally, each with its own adapter."""

from peftlab.methods import register_method
from peftlab.methods.bitune.config import BIDIR, CAUSAL, VARIANTS, BituneConfig
from peftlab.methods.bitune.layer import KVMixer, bidirectional_mask
from peftlab.methods.bitune.model import BituneMethod, BituneModel

register_method(BituneMethod())

__all__ = ["BIDIR", "CAUSAL", "VARIANTS", "BituneConfig", "BituneMethod", "BituneModel", "KVMixer",
           "bidirectional_mask"]
