"""ReFT: low-rank interventions on hidden representations (LoReFT and family), native on transformers 5."""

from peftlab.methods import register_method
from peftlab.methods.reft.config import ReftConfig
from peftlab.methods.reft.layer import INTERVENTIONS
from peftlab.methods.reft.model import ReftMethod, ReftModel

for _name in INTERVENTIONS:
    register_method(ReftMethod(_name))

__all__ = ["INTERVENTIONS", "ReftConfig", "ReftMethod", "ReftModel"]
