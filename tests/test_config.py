"""peftlab.config: dataclasses from dicts, dotted overrides, YAML files; and TrainConfig.from_yaml on top."""

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from peftlab.config import ConfigError, from_dict, load_yaml, set_dotted
from peftlab.training import DataConfig, TrainConfig


@dataclass
class Inner:
    a: int = 1
    b: str = "x"


@dataclass
class Outer:
    name: str = "o"
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Required:
    n: int

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def starts(text):
    return "^" + re.escape(text)


# ---------------------------------------------------------------- from_dict


def test_from_dict_fills_nested_dataclasses():
    out = from_dict(Outer, {"name": "n", "inner": {"a": 5}, "extra": {"k": [1, 2]}})
    assert out == Outer(name="n", inner=Inner(a=5, b="x"), extra={"k": [1, 2]})


def test_from_dict_defaults_and_does_not_mutate_its_input():
    assert from_dict(Outer, None) == Outer()
    assert from_dict(Outer, {}) == Outer()
    values = {"inner": {"b": "y"}}
    assert from_dict(Outer, values).inner == Inner(a=1, b="y")
    assert values == {"inner": {"b": "y"}}
    ready = Inner(a=9)
    assert from_dict(Outer, {"inner": ready}).inner is ready


def test_from_dict_unknown_key_names_the_key_and_where():
    with pytest.raises(ConfigError, match=starts("run.yaml: unknown key(s) ['bogus', 'zzz']; "
                                                 "known: ['extra', 'inner', 'name']")):
        from_dict(Outer, {"zzz": 1, "name": "n", "bogus": 2}, where="run.yaml")


def test_from_dict_unknown_nested_key_names_the_path():
    with pytest.raises(ConfigError, match=starts("run.yaml.inner: unknown key(s) ['c']; known: ['a', 'b']")):
        from_dict(Outer, {"inner": {"a": 2, "c": 3}}, where="run.yaml")
    with pytest.raises(ConfigError, match=starts("config.inner: unknown key(s) ['c']")):
        from_dict(Outer, {"inner": {"c": 3}})


def test_from_dict_constructor_errors_become_config_errors():
    with pytest.raises(ConfigError, match=r"^cfg: .*missing 1 required positional argument: 'n'"):
        from_dict(Required, {}, where="cfg")
    with pytest.raises(ConfigError, match=r"^cfg: n must be >= 0, got -1$"):
        from_dict(Required, {"n": -1}, where="cfg")
    assert from_dict(Required, {"n": 3}) == Required(3)


# ---------------------------------------------------------------- set_dotted


def test_set_dotted_parses_values_as_yaml():
    tree: dict[str, Any] = {}
    set_dotted(tree, "a.b=3")
    set_dotted(tree, "x=[1,2]")
    set_dotted(tree, "flag=true")
    set_dotted(tree, "s=hello world")
    set_dotted(tree, "q='3'")
    set_dotted(tree, "f=0.5")
    set_dotted(tree, "n=")
    set_dotted(tree, "d={k: v}")
    assert tree == {"a": {"b": 3}, "x": [1, 2], "flag": True, "s": "hello world", "q": "3", "f": 0.5, "n": None,
                    "d": {"k": "v"}}
    assert type(tree["a"]["b"]) is int


def test_only_true_and_false_are_booleans(tmp_path):
    tree: dict[str, Any] = {}
    for word in ("no", "yes", "on", "off"):  # YAML 1.1 would make these booleans: save_strategy: no -> False
        set_dotted(tree, f"{word}={word}")
    set_dotted(tree, "t=True")
    set_dotted(tree, "f=false")
    assert tree == {"no": "no", "yes": "yes", "on": "on", "off": "off", "t": True, "f": False}
    (tmp_path / "c.yaml").write_text("training: {save_strategy: no}\nflag: TRUE\n")
    assert load_yaml(tmp_path / "c.yaml") == {"training": {"save_strategy": "no"}, "flag": True}


def test_set_dotted_exponent_without_a_dot_is_a_float():
    # PyYAML alone reads 1e-3 as the string '1e-3'; the CLI help suggests exactly this form
    tree: dict[str, Any] = {}
    set_dotted(tree, "training.learning_rate=1e-3")
    set_dotted(tree, "training.eps=-2E+5")
    set_dotted(tree, "training.name=1e-3x")
    assert tree == {"training": {"learning_rate": 0.001, "eps": -200000.0, "name": "1e-3x"}}
    assert type(tree["training"]["learning_rate"]) is float


def test_set_dotted_grows_a_name_shorthand_into_a_mapping():
    tree = {"method": "lora", "model": "m"}
    set_dotted(tree, "method.r=4")
    assert tree == {"method": {"name": "lora", "r": 4}, "model": "m"}
    set_dotted(tree, "method.alpha=16")
    assert tree["method"] == {"name": "lora", "r": 4, "alpha": 16}


def test_set_dotted_keeps_siblings_and_replaces_non_mappings():
    tree = {"training": {"max_steps": 5, "lr": 1.0}, "n": 7}
    set_dotted(tree, "training.lr=0.25")
    set_dotted(tree, "n.deep.er=1")
    set_dotted(tree, " k = a=b")  # key is stripped; only the first '=' splits
    assert tree == {"training": {"max_steps": 5, "lr": 0.25}, "n": {"deep": {"er": 1}}, "k": "a=b"}


def test_set_dotted_needs_key_equals_value():
    with pytest.raises(ConfigError, match=r"^override 'training\.lr' must look like key=value"):
        set_dotted({}, "training.lr")


def test_set_dotted_invalid_yaml_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^override 'x=\[1,2': the value is not valid YAML"):
        set_dotted({}, "x=[1,2")


# ---------------------------------------------------------------- load_yaml


def test_load_yaml_reads_a_mapping_and_applies_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "model: m\nmethod: lora\ntraining:\n  max_steps: 5\n  learning_rate: 1e-4\n")
    assert load_yaml(path) == {"model": "m", "method": "lora",
                               "training": {"max_steps": 5, "learning_rate": 0.0001}}
    assert load_yaml(str(path), ["training.max_steps=7", "method.r=8"]) == {
        "model": "m", "method": {"name": "lora", "r": 8}, "training": {"max_steps": 7, "learning_rate": 0.0001}}


def test_load_yaml_without_a_file_or_with_an_empty_one(tmp_path):
    assert load_yaml(None) == {}
    assert load_yaml(None, ["a.b=1"]) == {"a": {"b": 1}}
    assert load_yaml(write(tmp_path / "empty.yaml", "")) == {}
    assert load_yaml(write(tmp_path / "comments.yaml", "# nothing here\n")) == {}


def test_load_yaml_invalid_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "a: 1\nb: 2\n  c: 3\nd: 4\n")
    with pytest.raises(ConfigError, match=starts(f"{path}:3: invalid YAML (mapping values are not allowed here)")):
        load_yaml(path)
    path = write(tmp_path / "bad2.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=starts(f"{path}:3: invalid YAML")):
        load_yaml(path)


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=starts(f"{path}: no such config file") + "$"):
        load_yaml(path)


def test_load_yaml_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigError, match=starts(f"{path}: not valid UTF-8")):
        load_yaml(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_load_yaml_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=starts(f"{path}: the config must be a mapping of keys to values") + "$"):
        load_yaml(path)


# ---------------------------------------------------------------- TrainConfig.from_yaml


def test_train_config_from_yaml_with_overrides(tmp_path):
    path = write(tmp_path / "run.yaml", "model: tiny\nmethod: lora\ndata:\n  train: t.jsonl\n  max_length: 64\n"
                                        "training:\n  max_steps: 5\n  learning_rate: 0.1\n")
    config = TrainConfig.from_yaml(path, ["training.learning_rate=0.001", "method.r=4"])
    assert config.model == "tiny"
    assert config.method == {"name": "lora", "r": 4}
    assert config.training == {"max_steps": 5, "learning_rate": 0.001}
    assert type(config.training["learning_rate"]) is float
    assert config.data == DataConfig(train="t.jsonl", max_length=64)
    assert config.overwrite is False and config.output is None


def test_train_config_from_yaml_without_a_file():
    config = TrainConfig.from_yaml(None, ["method=ia3", "training.learning_rate=1e-3", "overwrite=true"])
    assert config.method == {"name": "ia3"}
    assert config.training == {"learning_rate": 0.001}
    assert config.overwrite is True
    assert config.data == DataConfig()


def test_train_config_unknown_top_level_key_names_the_file(tmp_path):
    path = write(tmp_path / "run.yaml", "model: tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=starts(f"{path}: unknown key(s) ['learning_rate']; known: ")):
        TrainConfig.from_yaml(path)


def test_train_config_unknown_data_key_names_the_section(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: t.jsonl\n  max_len: 64\n")
    with pytest.raises(ConfigError, match=starts(f"{path}.data: unknown key(s) ['max_len']")):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=starts("config: unknown key(s) ['modle']")):
        TrainConfig.from_yaml(None, ["modle=x"])


def test_train_config_method_needs_a_name(tmp_path):
    path = write(tmp_path / "run.yaml", "method:\n  r: 4\n")
    with pytest.raises(ConfigError, match=starts(f"{path}: method: needs a 'name' (e.g. lora, ia3); got {{'r': 4}}")):
        TrainConfig.from_yaml(path)
