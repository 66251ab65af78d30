"""Per-example fields: an ``adapter`` named on each record reaches the model through encode, padded and packed
collation, forward, backward and generate (beams, num_return_sequences). A toy routed method adds a learned
per-adapter vector to the embeddings, so a wrong route changes the logits."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from floats import assert_close
from peftlab import attach, generate, load, load_records, save, tiny_model
from peftlab.context import per_token
from peftlab.data import Collator, DataError, encode
from peftlab.methods import METHODS, Method, MethodConfig, PeftlabModel, register_method


@dataclass
class ShiftConfig(MethodConfig):
    scale: float = 1.0


class ShiftModel(PeftlabModel):
    """Embeddings + shift[adapter of the example]: the smallest layer that reads its route from the context."""

    def __init__(self, model, method):
        super().__init__(model, method)
        self.shifts = nn.ParameterDict()
        self._handle = self.causal_lm.get_input_embeddings().register_forward_hook(self._shift)

    def add_adapter(self, name, config):
        self.model.requires_grad_(False)
        self.shifts[name] = nn.Parameter(config.scale * torch.randn(self.causal_lm.config.hidden_size))
        self.adapters[name] = config

    def _shift(self, module, args, out):
        table = torch.stack([self.shifts[name] for name in self.adapters])
        slots = self.context.adapter_slots
        return out + (table[0] if slots is None else table[per_token(slots, out.shape[:2])])

    def adapter_state_dict(self, name="default"):
        return {"shift": self.shifts[name].detach()}

    def _load_tensors(self, tensors, name):
        self.shifts[name].copy_(tensors["shift"])

    def _detach(self):
        self._handle.remove()
        return self.model


class ShiftMethod(Method):
    name = "toy-shift"
    config_class = ShiftConfig
    model_class = ShiftModel
    routable = True
    supports_packing = True

    def write_files(self, folder, config, tensors, base_model):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "shift.safetensors"))

    def read_files(self, folder, config):
        return load_file(str(folder / "shift.safetensors"))


NAMES = ("a", "b", "c")
RECORDS = [{"prompt": f"say {w}", "response": f"{w}!", "adapter": NAMES[i % 3]}
           for i, w in enumerate(("red", "blue", "green", "cat", "dog"))]


@pytest.fixture
def routed():
    method = register_method(ShiftMethod())
    model, tokenizer = tiny_model()
    torch.manual_seed(0)
    wrapped = None
    for name in NAMES:
        wrapped = attach(wrapped or model, "toy-shift", {"scale": 0.5}, name=name)
    yield wrapped.eval(), tokenizer
    del METHODS[method.name]


def _alone(model, feature, **kwargs):
    batch = Collator(0)([feature])
    batch.pop("adapter_names")
    batch.pop("adapter_index")
    return model(**batch, adapter_names=[feature["adapter"]], adapter_index=torch.tensor([0]), **kwargs)


def test_records_keep_their_fields_and_encode_passes_the_route(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(RECORDS)))
    records = load_records(path)
    assert [r.fields for r in records[:2]] == [{"adapter": "a", "id": 0}, {"adapter": "b", "id": 1}]
    features, _ = encode(records, tiny_model()[1])
    assert [f["adapter"] for f in features] == ["a", "b", "c", "a", "b"] and "id" not in features[0]
    path.write_text(json.dumps({"prompt": "x", "response": "y", "adapter": 3}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'adapter' must be a non-empty adapter name"):
        load_records(path)


def test_padded_and_packed_batches_route_each_example(routed):
    model, tokenizer = routed
    features, _ = encode(load_records(RECORDS), tokenizer)
    padded = Collator(tokenizer.pad_token_id)(features)
    assert padded["adapter_names"] == ["a", "b", "c"] and padded["adapter_index"].tolist() == [0, 1, 2, 0, 1]
    packed = Collator(tokenizer.pad_token_id, pack=True)(features)
    assert packed["adapter_index"].shape == packed["input_ids"].shape  # per token
    with torch.no_grad():
        by_row = model(**padded).logits
        by_token = model(**packed).logits[0]
        start = 0
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            alone = _alone(model, f).logits[0]
            assert_close(by_row[i, :n], alone, f"row {i} padded vs alone")
            assert_close(by_token[start:start + n], alone, f"row {i} packed vs alone")
            start += n
        wrong = {**padded, "adapter_index": padded["adapter_index"].roll(1)}
        assert (model(**wrong).logits - by_row).abs().max() > 1e-2  # a wrong route changes the logits


def test_gradients_reach_only_the_adapters_the_batch_uses(routed):
    model, tokenizer = routed
    features, _ = encode(load_records(RECORDS), tokenizer)
    for pack in (False, True):
        model.zero_grad()
        model(**Collator(tokenizer.pad_token_id, pack=pack)(features[:2])).loss.backward()  # adapters a and b
        assert model.shifts["a"].grad.abs().sum() > 0 and model.shifts["b"].grad.abs().sum() > 0
        assert model.shifts["c"].grad is None or model.shifts["c"].grad.abs().sum() == 0


def test_generate_routes_each_prompt_through_beams_and_return_sequences(routed):
    model, tokenizer = routed
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [12, 13]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    route = {"adapter_names": ["a", "b", "c"], "adapter_index": torch.tensor([2, 0, 1])}
    settings = {"max_new_tokens": 4, "pad_token_id": 0, "eos_token_id": None}
    for extra in ({"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
                  {"do_sample": True, "top_k": 1, "num_return_sequences": 2}):  # top_k=1: sampling = greedy
        out = model.generate(input_ids=ids, attention_mask=mask, **route, **settings, **extra)
        assert out.shape[0] == 6
        for i, p in enumerate(prompts):
            name = route["adapter_names"][route["adapter_index"][i]]
            alone = model.generate(input_ids=torch.tensor([p]), adapter_names=[name],
                                   adapter_index=torch.tensor([0]), **settings, **extra)
            for k in range(2):
                assert out[2 * i + k, width:].tolist() == alone[k, len(p):].tolist()
    answers = generate(model, tokenizer, ["say red", "say red"], adapters=["a", "c"], max_new_tokens=6)
    assert answers == [generate(model, tokenizer, ["say red"], adapters=[name], max_new_tokens=6)[0]
                       for name in ("a", "c")]


def test_bad_routes_are_refused_with_the_names(routed, tmp_path):
    model, tokenizer = routed
    with pytest.raises(ValueError, match=r"adapters \['z'\] are not in this model; it has \['a', 'b', 'c'\]"):
        model(input_ids=torch.tensor([[3, 4]]), adapter_names=["z"], adapter_index=torch.tensor([0]))
    features, _ = encode(load_records([RECORDS[0], {"prompt": "x", "response": "y"}]), tokenizer)
    with pytest.raises(ValueError, match="field 'adapter' is set on examples \\[0\\]"):
        Collator(0)(features)
    lora = attach(tiny_model()[0], "lora", {"r": 2})
    with pytest.raises(ValueError, match=r"adapters \['x'\] are not in this model; it has \['default'\]"):
        lora(input_ids=torch.tensor([[3], [4]]), adapter_names=["default", "x"], adapter_index=torch.tensor([0, 1]))


def test_a_module_with_several_adapters_round_trips(routed, tmp_path):
    model, tokenizer = routed
    save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "peftlab.json").read_text())
    assert {n: a["path"] for n, a in manifest["adapters"].items()} == {"a": ".", "b": "b", "c": "c"}
    assert Path(tmp_path / "m" / "c" / "shift.safetensors").exists()
    restored = load(tmp_path / "m", tiny_model()[0])
    batch = Collator(tokenizer.pad_token_id)(encode(load_records(RECORDS), tokenizer)[0])
    with torch.no_grad():  # the same tensors read back, the same batch: the same forward
        assert torch.equal(restored(**batch).logits, model(**batch).logits)
