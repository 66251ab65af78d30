"""Module arithmetic: the expression language, exact LoRA algebra checked against peft, the SVD export's reported
error, PEM's factor rule, IA3's operators, task vectors with TIES/DARE, the checks, the CLI and the λ search."""

import hashlib
import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from floats import FLOAT32, assert_close
from peftlab import load_model
from peftlab.compose import ComposeError, Expression, ExpressionError, compose, parse_grid, search

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _lora_folder(folder, tiny_dir, seed, r=2, alpha=8, rslora=False, a_from=None):
    """A plain peft LoRA folder with random A and B (``a_from``: copy the A factors of that folder)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_model(str(tiny_dir))[0], peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora))
    shared = load_file(str(a_from / "adapter_model.safetensors")) if a_from else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
                key = name.replace(".default", "")
                if "lora_A" in name and key in shared:
                    p.copy_(shared[key])
    model.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def loras(tmp_path, tiny_dir):
    """Three random LoRAs of different ranks (c with rsLoRA), and ``a2``: a copy of ``a`` under another name."""
    made = {"a": _lora_folder(tmp_path / "a", tiny_dir, 1, r=2),
            "b": _lora_folder(tmp_path / "b", tiny_dir, 2, r=3, alpha=4),
            "c": _lora_folder(tmp_path / "c", tiny_dir, 3, r=4, rslora=True)}
    made["a2"] = _lora_folder(tmp_path / "a2", tiny_dir, 1, r=2)
    return made


def _peft_deltas(tiny_dir, folder, adapter="default"):
    """Each LoRA layer's ΔW as peft computes it (scale included)."""
    model = peft.PeftModel.from_pretrained(load_model(str(tiny_dir))[0], folder, adapter_name=adapter)
    return {name: m.get_delta_weight(adapter) for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _combined(tiny_dir, loras, coefficients):
    per = {n: _peft_deltas(tiny_dir, loras[n]) for n in coefficients}
    layers = next(iter(per.values()))
    return {layer: sum(c * per[n][layer] for n, c in coefficients.items()) for layer in layers}


def _assert_same_deltas(got, want, what):
    """Every layer's ΔW of ``got`` equals ``want``'s up to float rounding: the two sides sum the same rank-1 terms in
    another order (peft's B @ A on concatenated factors against a sum of each source's B @ A)."""
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], f"{what}: ΔW of {k}")


def _logits(tiny_dir, folder):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(load_model(str(tiny_dir))[0], folder).eval()(input_ids=IDS).logits


# --- the expression language ------------------------------------------------------------------------------------
def test_expressions_reduce_to_one_coefficient_per_module():
    assert Expression("0.5*a + 0.5*b - 0.3*toxic").evaluate(modules=["a", "b", "toxic"]) == {
        "a": 0.5, "b": 0.5, "toxic": -0.3}
    assert Expression("analogy(a, b, c)").evaluate(modules="abc") == {"a": 1, "b": -1, "c": 1}
    assert Expression("-(a - 2*b)/4 + a").evaluate(modules="ab") == {"a": 0.75, "b": 0.5}
    assert Expression("lam*a + (1 - lam)*b").evaluate({"lam": 0.25}, modules="ab") == {"a": 0.25, "b": 0.75}
    assert Expression("a - a").evaluate(modules="a") == {"a": 0.0}


@pytest.mark.parametrize("text, message, position", [
    ("a*b", "cannot multiply two modules", 1), ("a + 2", "cannot add a number to a module", 4),
    ("2a", "unexpected 'a'", 1), ("(a + b", "expected ')'", 6), ("a/0", "division by zero", 2),
    ("b/a", "cannot divide by a module", 2), ("foo(a)", "unknown function 'foo'", 0),
    ("analogy(a, b)", "takes 3 arguments", 0), ("a + c", "unknown name 'c'; known: a, b", 4),
    ("a $ b", "unexpected character '$'", 2), ("3*2", "is a number", 0)])
def test_bad_expressions_point_at_the_fault(text, message, position):
    with pytest.raises(ExpressionError, match=re.escape(message)) as caught:
        Expression(text).evaluate(modules="ab")
    assert caught.value.position == position
    assert str(caught.value).endswith(f"  {text}\n  {' ' * position}^")


# --- LoRA algebra ---------------------------------------------------------------------------------------------
def test_a_plus_minus_a_is_zero_and_two_a_is_a_plus_a(tmp_path, tiny_dir, loras):
    modules = {"a": loras["a"], "a2": loras["a2"]}
    compose("a - a2", modules, tmp_path / "zero")  # the same weights under two names: computed, not simplified
    zero = _peft_deltas(tiny_dir, tmp_path / "zero")
    for layer, delta in zero.items():  # B·A - B·A summed in one matmul: 0 up to rounding
        assert_close(delta, torch.zeros_like(delta), f"ΔW of {layer}")
    compose("2*a", {"a": loras["a"]}, tmp_path / "twice")
    compose("a + a2", modules, tmp_path / "sum")
    _assert_same_deltas(_peft_deltas(tiny_dir, tmp_path / "twice"), _peft_deltas(tiny_dir, tmp_path / "sum"), "2a")
    with pytest.raises(ComposeError, match="every coefficient is zero"):
        compose("a + (-a)", {"a": loras["a"]}, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_the_concat_export_is_the_exact_sum_and_equals_peft_cat(tmp_path, tiny_dir, loras):
    coefficients = {"a": 0.7, "b": -0.4, "c": 1.5}
    record = compose("0.7*a - 0.4*b + 1.5*c", {k: loras[k] for k in "abc"}, tmp_path / "out")
    assert record["result"]["rank"] == 2 + 3 + 4
    want = _combined(tiny_dir, loras, coefficients)  # peft's own ΔW of each source, rsLoRA scale included
    _assert_same_deltas(_peft_deltas(tiny_dir, tmp_path / "out"), want, "concat")
    # peft's cat on the same adapters (without the rsLoRA one: peft's cat scales an rsLoRA merge by √r, a known bug)
    model = peft.PeftModel.from_pretrained(load_model(str(tiny_dir))[0], loras["a"], adapter_name="a")
    model.load_adapter(loras["b"], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    theirs = {n: m.get_delta_weight("mix") for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    compose("0.7*a - 0.4*b", {k: loras[k] for k in "ab"}, tmp_path / "ab")
    _assert_same_deltas(_peft_deltas(tiny_dir, tmp_path / "ab"), theirs, "vs peft's cat")


def test_the_svd_export_reports_the_error_it_makes(tmp_path, tiny_dir, loras):
    modules = {k: loras[k] for k in "abc"}
    want = _combined(tiny_dir, loras, {"a": 1, "b": 1, "c": -1})
    for rank in (1, 3, 9):
        record = compose("a + b - c", modules, tmp_path / f"r{rank}", export="svd", rank=rank)
        got = _peft_deltas(tiny_dir, tmp_path / f"r{rank}")
        measured = (sum(float((got[k] - want[k]).norm() ** 2) for k in want)
                    / sum(float(want[k].norm() ** 2) for k in want)) ** 0.5
        assert_close(measured, record["result"]["relative_error"], f"rank {rank} error, measured vs reported")
        assert (measured < FLOAT32) == (rank == 9)  # rank Σr keeps everything: only float32 rounding is left
    record = compose("a + b - c", modules, tmp_path / "energy", export="svd", energy=0.9)
    kept = 1 - max(record["result"]["layer_relative_error"].values()) ** 2
    assert kept >= 0.9 - 1e-9 and 1 <= record["result"]["rank"] < 9


def test_an_svd_rank_above_the_sum_of_ranks_is_capped_with_a_note(tmp_path, tiny_dir, loras, capsys):
    from peftlab.cli import main

    modules = [arg for k in "abc" for arg in ("-m", f"{k}={loras[k]}")]
    assert main(["compose", "a + b - c", *modules, "-o", str(tmp_path / "big"), "--export", "svd", "--rank",
                 "1000"]) == 0
    err = capsys.readouterr().err
    result = json.loads((tmp_path / "big" / "compose.json").read_text())["result"]
    assert result["rank"] == 2 + 3 + 4 and result["requested_rank"] == 1000  # Σr: ΔW has no more non-zero σ
    assert "note: --rank 1000 is above" in err
    assert json.loads((tmp_path / "big" / "adapter_config.json").read_text())["r"] == 9
    tensors = load_file(str(tmp_path / "big" / "adapter_model.safetensors"))
    assert {v.shape[0] for k, v in tensors.items() if "lora_A" in k} == {9}
    compose("a + b - c", {k: loras[k] for k in "abc"}, tmp_path / "r9", export="svd", rank=9)
    _assert_same_deltas(_peft_deltas(tiny_dir, tmp_path / "big"), _peft_deltas(tiny_dir, tmp_path / "r9"), "capped")
    assert_close(_logits(tiny_dir, tmp_path / "big"), _logits(tiny_dir, tmp_path / "r9"), "capped logits")


def test_the_merged_export_is_base_plus_the_sum(tmp_path, tiny_dir, loras):
    modules = {k: loras[k] for k in "ab"}
    compose("0.5*a - 2*b", modules, tmp_path / "merged", export="merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base = load_model(str(tiny_dir))[0].state_dict()
    want = _combined(tiny_dir, loras, {"a": 0.5, "b": -2})
    for layer, delta in want.items():
        key = layer.removeprefix("base_model.model.") + ".weight"
        assert_close(merged[key] - base[key], delta, key)
    assert json.loads((tmp_path / "merged" / "compose.json").read_text())["coefficients"] == {"a": 0.5, "b": -2}


def test_every_export_loads_in_plain_peft_with_the_combination_logits(tmp_path, tiny_dir, loras):
    modules = {k: loras[k] for k in "ab"}
    model = load_model(str(tiny_dir))[0]
    want = _combined(tiny_dir, loras, {"a": 1, "b": 1})
    with torch.no_grad():
        for layer, delta in want.items():
            model.get_submodule(layer.removeprefix("base_model.model.")).weight += delta
        reference = model(input_ids=IDS).logits
    compose("a + b", modules, tmp_path / "cat")
    compose("a + b", modules, tmp_path / "svd", export="svd", rank=5)
    for folder in ("cat", "svd"):
        assert_close(_logits(tiny_dir, tmp_path / folder), reference, f"{folder} logits")


# --- PEM's factor rule --------------------------------------------------------------------------------------------
def test_pem_mode_is_exact_with_a_shared_init_and_reports_its_error_without(tmp_path, tiny_dir, loras):
    shared = _lora_folder(tmp_path / "shared", tiny_dir, 7, r=2, a_from=loras["a"])
    record = compose("0.6*a - 0.9*s", {"a": loras["a"], "s": shared}, tmp_path / "pem", mode="pem")
    # both are relative, and 0 but for float32 rounding here; without a shared init they pass 0.1 and 0.3 (below)
    assert record["result"]["max_a_drift"] < FLOAT32 and record["result"]["relative_error"] < FLOAT32
    exact = {"a": 0.6, "s": -0.9}
    per = {"a": _peft_deltas(tiny_dir, loras["a"]), "s": _peft_deltas(tiny_dir, shared)}
    want = {k: sum(c * per[n][k] for n, c in exact.items()) for k in per["a"]}
    _assert_same_deltas(_peft_deltas(tiny_dir, tmp_path / "pem"), want, "pem")
    record = compose("0.5*a + 0.5*a2x", {"a": loras["a"], "a2x": _lora_folder(tmp_path / "ind", tiny_dir, 9)},
                     tmp_path / "pem2", mode="pem")
    got = _peft_deltas(tiny_dir, tmp_path / "pem2")
    per = {"a": _peft_deltas(tiny_dir, loras["a"]), "x": _peft_deltas(tiny_dir, tmp_path / "ind")}
    want = {k: 0.5 * per["a"][k] + 0.5 * per["x"][k] for k in got}
    measured = (sum(float((got[k] - want[k]).norm() ** 2) for k in want)
                / sum(float(want[k].norm() ** 2) for k in want)) ** 0.5
    assert_close(measured, record["result"]["relative_error"], "error, measured vs reported")
    assert measured > 0.3
    assert "shared initialisation" in record["result"]["warning"]
    with pytest.raises(ComposeError, match="same rank"):
        compose("a + b", {k: loras[k] for k in "ab"}, tmp_path / "pem3", mode="pem")


# --- IA3 ----------------------------------------------------------------------------------------------------------
def _ia3_folder(folder, tiny_dir, seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_model(str(tiny_dir))[0], peft.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    model.save_pretrained(folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_ia3_uses_pem_operators(tmp_path, tiny_dir):
    la, lb = _ia3_folder(tmp_path / "a", tiny_dir, 1), _ia3_folder(tmp_path / "b", tiny_dir, 2)
    modules = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for text, want in (("-a", {k: 2 - v for k, v in la.items()}),
                       ("-0.5*a", {k: 1 - 0.5 * (v - 1) for k, v in la.items()}),
                       ("0.3*a + 0.7*b", {k: 0.3 * la[k] + 0.7 * lb[k] for k in la})):
        out = tmp_path / text.replace("*", "x").replace(" ", "")
        compose(text, {k: v for k, v in modules.items() if k in text}, out)
        got = load_file(str(out / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert_close(got[k], want[k], f"{text}: {k}")
        peft.PeftModel.from_pretrained(load_model(str(tiny_dir))[0], out)  # loads in plain peft
    with pytest.raises(ComposeError, match="IA3 vectors have none"):
        compose("a + b", modules, tmp_path / "svd", export="svd", rank=2)
    compose("-0.5*a", {"a": modules["a"]}, tmp_path / "merged", export="merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert_close(merged(input_ids=IDS).logits, _logits(tiny_dir, tmp_path / "-0.5xa"), "merged vs peft")


# --- full models: task vectors, TIES, DARE ------------------------------------------------------------------------
@pytest.fixture
def finetunes(tmp_path, tiny_dir):
    """Two 'fine-tuned' copies of the tiny model: the base plus a random task vector each."""
    base = load_file(str(tiny_dir / "model.safetensors"))
    folders, vectors = {}, {}
    for i, name in enumerate(("x", "y")):
        torch.manual_seed(20 + i)
        vectors[name] = {k: 0.01 * torch.randn_like(v) for k, v in base.items()}
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_dir.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file({k: base[k] + vectors[name][k] for k in base}, str(folder / "model.safetensors"))
        folders[name] = folder
    return base, vectors, folders


def test_task_vectors_are_base_plus_weighted_deltas(tmp_path, tiny_dir, finetunes):
    base, vectors, folders = finetunes
    compose("0.5*x - 0.25*y", folders, tmp_path / "out", base=str(tiny_dir))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in base:
        want = base[k] + 0.5 * vectors["x"][k] - 0.25 * vectors["y"][k]
        assert_close(got[k], want, k)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable model folder
    with pytest.raises(ComposeError, match="name θ₀ with --base"):
        compose("x + y", folders, tmp_path / "nobase")


def test_ties_and_dare_follow_their_definitions(tmp_path, tiny_dir, finetunes):
    from peftlab.compose.dense import combine_deltas

    base, vectors, folders = finetunes
    compose("x + y", folders, tmp_path / "ties1", base=str(tiny_dir), ties=1.0)
    got = load_file(str(tmp_path / "ties1" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    tx, ty = vectors["x"][key], vectors["y"][key]
    agree = torch.sign(tx) == torch.sign(ty)  # density 1: only sign conflicts remove entries
    elected = torch.sign(tx + ty)
    want = tx * (torch.sign(tx) == elected) + ty * (torch.sign(ty) == elected)  # one of the two where they disagree
    want[agree] /= 2  # the disjoint mean: both, averaged, where they agree
    assert_close(got[key] - base[key], want, "TIES")
    assert_close((got[key] - base[key])[agree], ((tx + ty) / 2)[agree], "TIES where the signs agree")
    trimmed = combine_deltas([tx], [1.0], ties=0.1)
    assert (trimmed != 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(trimmed[trimmed != 0], tx[trimmed != 0])  # the largest entries, kept as they were
    g = torch.Generator().manual_seed(0)
    dropped = combine_deltas([tx], [1.0], dare_drop=0.5, generator=g)
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert_close(dropped[kept], 2 * tx[kept], "DARE's rescaled entries")
    compose("x", {"x": folders["x"]}, tmp_path / "d1", base=str(tiny_dir), dare=0.5, seed=3)
    compose("x", {"x": folders["x"]}, tmp_path / "d2", base=str(tiny_dir), dare=0.5, seed=3)
    assert (tmp_path / "d1" / "model.safetensors").read_bytes() == (tmp_path / "d2" / "model.safetensors").read_bytes()


# --- checks before any arithmetic --------------------------------------------------------------------------------
def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_mismatches_are_refused_naming_both_sides_and_inputs_stay_untouched(tmp_path, tiny_dir, loras):
    from peftlab import attach, save, tiny_model

    before = {k: _digest(v) for k, v in loras.items()}
    other = _lora_folder(tmp_path / "k", tiny_dir, 5)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "another/model"}))
    with pytest.raises(ComposeError, match=rf"a \({re.escape(str(loras['a']))}\) was trained on .*, "
                                           rf"k \({re.escape(str(other))}\) on 'another/model'"):
        compose("a + k", {"a": loras["a"], "k": other}, tmp_path / "o1")
    compose("a + k", {"a": loras["a"], "k": other}, tmp_path / "o1", base=str(tiny_dir))  # asserted the same
    narrow = peft.get_peft_model(load_model(str(tiny_dir))[0], peft.LoraConfig(r=2, target_modules=["q_proj"]))
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ComposeError, match="target different layers: q .*lacks .*v_proj"):
        compose("a + q", {"a": loras["a"], "q": tmp_path / "narrow"}, tmp_path / "o2", base=str(tiny_dir))
    reft = attach(tiny_model()[0], "loreft", {"layers": [0], "rank": 2})
    save(reft, tmp_path / "reft")
    with pytest.raises(ComposeError, match="loreft module, which compose cannot do arithmetic on: an intervention"):
        compose("a - r", {"a": loras["a"], "r": tmp_path / "reft"}, tmp_path / "o3")
    dora = peft.get_peft_model(load_model(str(tiny_dir))[0], peft.LoraConfig(r=2, target_modules=TARGETS,
                                                                             use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ComposeError, match="use_dora=True"):
        compose("d", {"d": tmp_path / "dora"}, tmp_path / "o4")
    with pytest.raises(ComposeError, match=r"modules \['b'\] are given but the expression 'a' does not use them"):
        compose("a", {"a": loras["a"], "b": loras["b"]}, tmp_path / "o5")
    with pytest.raises(ComposeError, match="add --export svd"):
        compose("a", {"a": loras["a"]}, tmp_path / "o6", rank=2)
    compose("a", {"a": loras["a"]}, tmp_path / "o7")
    with pytest.raises(FileExistsError):
        compose("2*a", {"a": loras["a"]}, tmp_path / "o7")
    assert {k: _digest(v) for k, v in loras.items()} == before


def test_non_finite_coefficients_and_results_are_refused_and_nothing_is_written(tmp_path, tiny_dir, loras,
                                                                                finetunes, capsys):
    from peftlab.cli import main

    out = tmp_path / "out"
    for text, export, message in (
            ("1e400*a", "adapter", "the coefficient of a is inf"),  # inf in float64
            ("1e400*a - 1e400*a", "adapter", "the coefficient of a is nan"),
            *(("1e39*a", export, "lora_A.weight is not finite in torch.float32")  # finite in float64 only
              for export in ("adapter", "svd", "merged"))):
        rank = ["--rank", "2"] if export == "svd" else []
        assert main(["compose", text, "-m", f"a={loras['a']}", "-o", str(out), "--export", export, *rank]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(ComposeError, match=r"the result: \S+\.weight is not finite in torch\.float32"):
        compose("1e39*x", {"x": finetunes[2]["x"]}, out, base=str(tiny_dir))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_output_in_or_around_an_input_folder_is_refused(tmp_path, loras, capsys):
    from peftlab.cli import main

    before = {k: _digest(v) for k, v in loras.items()}
    args = ["compose", "a + b", "-m", f"a={loras['a']}", "-m", f"b={loras['b']}", "--overwrite", "-o"]
    for out, relation in ((loras["b"], "is the folder of input b"),
                          (loras["a"] / "sub", "is inside the folder of input a"),
                          (tmp_path / "b" / ".." / "a", "is the folder of input a"),  # real paths are compared
                          (tmp_path, "holds the folder of input a")):
        assert main([*args, str(out)]) == 2
        assert relation in capsys.readouterr().err
    with pytest.raises(ComposeError, match="is the folder of input a"):
        search("lam*a", {"a": loras["a"]}, loras["a"], {"lam": [1.0]}, score_by_b_share, overwrite=True)
    assert {k: _digest(v) for k, v in loras.items()} == before
    assert not (loras["a"] / "sub").exists()


# --- CLI and search -------------------------------------------------------------------------------------------------
def test_cli_composes_and_reports_errors_with_their_position(tmp_path, loras, capsys):
    from peftlab.cli import main

    args = ["compose", "0.5*a + 0.5*b", "-m", f"a={loras['a']}", "-m", f"b={loras['b']}"]
    assert main([*args, "-o", str(tmp_path / "out"), "--export", "svd", "--rank", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["coefficients"] == {"a": 0.5, "b": 0.5} and shown["rank"] == 2 and 0 < shown["relative_error"] < 1
    assert main(["compose", "0.5*a * b", "-m", f"a={loras['a']}", "-m", f"b={loras['b']}", "-o",
                 str(tmp_path / "bad")]) == 2
    assert "cannot multiply two modules (module arithmetic is linear) (at position 6)" in capsys.readouterr().err


def score_by_b_share(folder):
    """A scorer for the search test: prefers the candidate whose coefficient of b is closest to 0.3."""
    return -abs(json.loads((folder / "compose.json").read_text())["coefficients"]["b"] - 0.3)


def test_search_keeps_the_best_point_with_its_table_and_plot(tmp_path, loras):
    assert parse_grid("lam=0.1:0.5:0.2") == ("lam", [0.1, 0.3, 0.5])
    assert parse_grid("w=1,2") == ("w", [1.0, 2.0])
    with pytest.raises(ComposeError, match="NAME=START:STOP:STEP"):
        parse_grid("lam=0.1:0.5")
    table = search("lam*a + (1 - lam)*b", {k: loras[k] for k in "ab"}, tmp_path / "best",
                   {"lam": [0.1, 0.4, 0.7, 0.9]}, score_by_b_share)
    assert table["best"]["numbers"] == {"lam": 0.7}
    assert json.loads((tmp_path / "best" / "compose.json").read_text())["numbers"] == {"lam": 0.7}
    assert (tmp_path / "best" / "search.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "best" / "search.json").read_text())["points"]) == 4
    assert not list(tmp_path.glob(".best.search*"))


def test_search_with_the_eval_scorer_records_what_peftlab_eval_measures(tmp_path, loras, capsys):
    from peftlab.cli import main
    from peftlab.evals.runner import evaluate, load_candidate
    from peftlab.evals.suite import get_suite

    assert main(["compose", "lam*a + (1 - lam)*b", "-m", f"a={loras['a']}", "-m", f"b={loras['b']}", "-o",
                 str(tmp_path / "best"), "--search", "lam=0.2,0.8", "--families", "list_ops", "--n", "3"]) == 0
    table = json.loads((tmp_path / "best" / "search.json").read_text())
    assert [p["numbers"]["lam"] for p in table["points"]] == [0.2, 0.8]
    again = evaluate(load_candidate(str(tmp_path / "best")), get_suite("core"), split="validation", n=3,
                     families=["list_ops"], progress=False)
    assert again["summary"]["all"]["mean"] == table["best"]["score"]
    assert main(["compose", "lam*a", "-m", f"a={loras['a']}", "-o", str(tmp_path / "x"), "--search", "lam=1,2",
                 "--families", "list_ops", "--split", "test"]) == 2
    assert "would leak it" in capsys.readouterr().err
