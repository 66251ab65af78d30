"""The example configs parse, name data that exists, and build their method on the tiny model."""

from pathlib import Path

import pytest

from peftlab import TrainConfig, attach, tiny_model
from peftlab.methods import get_method

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["emoji-lora.yaml", "emoji-loreft.yaml"])
def test_example_config_is_complete(name):
    config = TrainConfig.from_yaml(ROOT / "examples" / name)
    assert (ROOT / config.data.train).is_file()
    method = get_method(config.method["name"])
    settings = {k: v for k, v in config.method.items() if k != "name"}
    if "layers" in settings:
        settings["layers"] = [1]  # the tiny model has two layers
    wrapped = attach(tiny_model()[0], method.name, method.config_class.from_dict(settings))
    assert any(p.requires_grad for p in wrapped.parameters())
