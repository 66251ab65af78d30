"""Every config under examples/ as shipped: it parses (unknown keys refused), names data that exists, gives
TrainingArguments only what they take, and builds its method on the model it names, unchanged."""

from pathlib import Path

import pytest
from transformers import TrainingArguments

from peftlab import TrainConfig, attach
from peftlab.methods import get_method
from peftlab.models import load_model
from peftlab.training import TRAINING_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
SUITES = [ROOT / "examples" / "bitune-suite.yaml"]  # evaluation suites (`peftlab eval --suite FILE`)
CONFIGS = sorted(set((ROOT / "examples").rglob("*.yaml")) - set(SUITES))


@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_example_suite_names_real_families(path):
    from peftlab.evals.suite import get_suite
    from peftlab.evals.tasks import FAMILIES

    suite = get_suite(str(path))
    assert suite.trained and set(suite.trained + suite.held_out) <= set(FAMILIES)


@pytest.fixture(scope="module")
def default_model():
    return load_model()[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_builds_as_shipped(path, default_model):
    config = TrainConfig.from_yaml(path)
    if config.data.train is not None:  # the Re-Tuning configs get their data from `peftlab retune train`
        # shipped data exists; data made under runs/ is written by the command the config's header gives
        made_by_header = f"-o {config.data.train}" in path.read_text()
        assert (ROOT / config.data.train).exists() or made_by_header, config.data.train
    TrainingArguments(**{**TRAINING_DEFAULTS, **config.training})
    assert config.model == "smollm2-135m-instruct"  # what the fixture loaded
    method = get_method(config.method["name"])
    settings = method.make_config({k: v for k, v in config.method.items() if k != "name"})
    wrapped = attach(default_model, method.name, settings)
    try:
        assert any(p.requires_grad for p in wrapped.parameters())
    finally:
        wrapped.unload()
