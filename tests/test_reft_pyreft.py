"""pyreft's checkpoint layout: written and read back, old key names, rotations stored as torch parametrisations."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from floats import assert_close
from peftlab import attach, tiny_model
from peftlab.methods.reft.pyreft_format import load_pyreft, read_pyreft_config, save_pyreft

IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])


def _trained(kind, **settings):
    model, _ = tiny_model()
    wrapped = attach(model, kind, {"layers": [0, 1], "rank": 4, **settings}).eval()
    with torch.no_grad():
        for name, p in wrapped.interventions.named_parameters():
            if "rotate_layer" not in name:
                p.normal_()
    return wrapped


@pytest.mark.parametrize("kind", ["loreft", "noreft", "direft"])
def test_round_trip_through_pyreft_layout(tmp_path, kind):
    wrapped = _trained(kind, positions="f1+l2", share_weights=False)
    save_pyreft(wrapped, tmp_path / "p")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["config.json"] + sorted(f"intkey_layer_{layer}_comp_block_output_unit_pos_nunit_1#{k}.bin"
                                             for layer in (0, 1) for k in (0, 1))
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["representations"][0][:5] == [0, "block_output", "pos", 1, 4]
    saved = torch.load(tmp_path / "p" / names[1], weights_only=True)
    if kind == "loreft":
        assert set(saved) == {"weight", "bias", "rotate_layer"} and saved["rotate_layer"].shape == (64, 4)
    kind_read, config_read = read_pyreft_config(tmp_path / "p", "f1+l2")
    assert kind_read == kind and config_read.short_prompts == "pyreft"  # imported modules cut prompts as pyreft
    restored = load_pyreft(tmp_path / "p", tiny_model()[0], positions="f1+l2", short_prompts="paper")
    with torch.no_grad():
        got, want = restored(input_ids=IDS).logits, wrapped(input_ids=IDS).logits
    if kind == "loreft":  # R is re-orthonormalised on load: ~1e-7 changes in R
        assert_close(got, want, "after the pyreft round trip")
    else:  # the same tensors read back, the same forward
        assert torch.equal(got, want)


def test_untied_layers_are_exported_in_pyreft_order_so_pyvene_pairs_positions_right(tmp_path):
    wrapped = _trained("loreft", layers=[0, 1], positions="f1+l2", share_weights=False)
    save_pyreft(wrapped, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    keys = config["sorted_keys"]
    assert [row[0] for row in config["representations"]] == [0, 1, 0, 1]
    assert [k.rsplit("#", 1)[1] for k in keys] == ["0", "0", "1", "1"]
    # pyreft (get_intervention_locations, share_weights=False) gives the first half of the interventions the
    # first positions and the second half the last ones: each must be the group peftlab trained it for
    half = len(keys) // 2
    assert [wrapped.groups[k] for k in keys] == ["first"] * half + ["last"] * half


def test_old_dotted_key_names_are_read(tmp_path):
    wrapped = _trained("loreft")
    save_pyreft(wrapped, tmp_path / "p")
    for f in (tmp_path / "p").glob("intkey_*.bin"):
        f.rename(f.with_name(f.name.replace("_", ".").replace("intkey.", "intkey_")))
    assert any("layer.0.comp.block.output" in p.name for p in (tmp_path / "p").iterdir())
    restored = load_pyreft(tmp_path / "p", tiny_model()[0])
    with torch.no_grad():  # R re-orthonormalised on load: ~1e-7 changes in R
        assert_close(restored(input_ids=IDS).logits, wrapped(input_ids=IDS).logits, "read from dotted names")


def test_rotation_saved_as_torch_parametrisation_is_recovered(tmp_path):
    """pyreft's Consreft/Lobireft/Direft save torch's orthogonal parametrisation state, not R itself."""
    wrapped = _trained("consreft", layers=[1])
    (key, iv), = wrapped.interventions.items()
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(64, 4))
    holder = torch.nn.utils.parametrizations.orthogonal(holder)
    with torch.no_grad():
        holder.weight = iv.rotate_layer.weight.detach()
    state = {f"rotate_layer.{k}": v for k, v in holder.state_dict().items()}
    state |= {"learned_source": iv.learned_source.detach(), "embed_dim": torch.tensor(64),
              "interchange_dim": torch.tensor(64)}
    folder = tmp_path / "p"
    folder.mkdir()
    torch.save(state, folder / f"intkey_{key}.bin")
    row = [1, "block_output", "pos", 1, 4] + [None] * 9
    (folder / "config.json").write_text(json.dumps({
        "representations": [row], "intervention_types": ["<class 'pyreft.interventions.ConsreftIntervention'>"]}))
    restored = load_pyreft(folder, tiny_model()[0])
    with torch.no_grad():  # R recovered from the parametrisation: another computation of R
        assert_close(restored(input_ids=IDS).logits, wrapped(input_ids=IDS).logits, "recovered R")
    with pytest.raises(NotImplementedError, match="pyreft's layout"):
        save_pyreft(restored, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_rank_names_both_shapes(tmp_path):
    save_pyreft(_trained("loreft"), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    for row in config["representations"]:
        row[4] = 8
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"intkey_layer_0.*\(64, 4\).*do not fit this LoReFT \(rank 8.*\(64, 8\)"):
        load_pyreft(tmp_path / "p", tiny_model()[0])


def test_convert_command_both_ways(tmp_path, tiny_dir):
    from peftlab import load, load_model, save
    from peftlab.cli import main

    model, _ = load_model(str(tiny_dir))
    wrapped = attach(model, "loreft", {"layers": [1], "rank": 4, "positions": "f1+l1"}).eval()
    save(wrapped, tmp_path / "module")
    assert main(["convert", str(tmp_path / "module"), "-o", str(tmp_path / "pyreft")]) == 0
    assert (tmp_path / "pyreft" / "config.json").exists()
    assert main(["convert", str(tmp_path / "pyreft"), "-o", str(tmp_path / "back"), "--model", str(tiny_dir),
                 "--positions", "f1+l1", "--short-prompts", "paper"]) == 0
    back = load(tmp_path / "back", load_model(str(tiny_dir))[0])
    assert back.reft_config == wrapped.reft_config
    with torch.no_grad():  # R re-orthonormalised on each load: ~1e-7 changes in R
        assert_close(back(input_ids=IDS).logits, wrapped(input_ids=IDS).logits, "converted both ways")
    # a module trained with pyreft's dataset helpers (last_position = n - 1) imports with its positions one early
    assert main(["convert", str(tmp_path / "pyreft"), "-o", str(tmp_path / "early"), "--model", str(tiny_dir),
                 "--positions", "f1+l1", "--prompt-end-offset", "1"]) == 0
    early = load(tmp_path / "early", load_model(str(tiny_dir))[0])
    assert early.reft_config.prompt_end_offset == 1
    with torch.no_grad():  # the last intervention moved off the final prompt token: the logits differ
        assert (early(input_ids=IDS).logits - back(input_ids=IDS).logits).abs().max() > 1e-4


def test_convert_of_a_module_that_is_not_reft_says_so(tmp_path, tiny_dir, capsys):
    from peftlab import load_model, save
    from peftlab.cli import main

    save(attach(load_model(str(tiny_dir))[0], "lora", {"r": 2}), tmp_path / "lora")
    assert main(["convert", str(tmp_path / "lora"), "-o", str(tmp_path / "out")]) == 2
    assert "a lora module; convert reads pyreft folders and writes ReFT modules" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_lora_trained_alongside_is_exported_beside_not_dropped(tmp_path, tiny_dir, capsys):
    import peft

    from peftlab import load, load_model, save
    from peftlab.cli import main

    wrapped = attach(load_model(str(tiny_dir))[0], "loreft", {"layers": [1], "rank": 2, "lora": {"r": 2}}).eval()
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save(wrapped, tmp_path / "module")
    assert main(["convert", str(tmp_path / "module"), "-o", str(tmp_path / "pyreft")]) == 0
    assert "pyreft keeps no LoRA" in capsys.readouterr().out
    exported = peft.PeftModel.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "pyreft" / "lora")
    theirs = peft.get_peft_model_state_dict(exported)
    ours = {k.removeprefix("lora."): v for k, v in wrapped.adapter_state_dict().items() if k.startswith("lora.")}
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # and back: the round trip keeps the LoRA (it used to come back without it, silently)
    assert main(["convert", str(tmp_path / "pyreft"), "-o", str(tmp_path / "back"), "--model", str(tiny_dir),
                 "--positions", "l1", "--short-prompts", "paper"]) == 0
    back = load(tmp_path / "back", load_model(str(tiny_dir))[0])
    assert back.reft_config.lora is not None
    with torch.no_grad():
        assert_close(back(input_ids=IDS).logits, wrapped(input_ids=IDS).logits, "export -> import")


def test_import_takes_the_activation_pyreft_does_not_record(tmp_path, tiny_dir):
    from peftlab import load, load_model, save
    from peftlab.cli import main

    wrapped = attach(load_model(str(tiny_dir))[0], "loreft", {"layers": [1], "rank": 4, "act": "relu"}).eval()
    torch.manual_seed(0)  # a draw where relu clips: at one position all 4 values of W·h + b could be positive
    with torch.no_grad():
        for name, p in wrapped.interventions.named_parameters():
            if "rotate_layer" not in name:
                p.normal_()
                if name.endswith("bias"):
                    p.sub_(3.0)  # negative enough that relu zeroes some of W·h + b, whatever h is
        want = wrapped(input_ids=IDS).logits
    save(wrapped, tmp_path / "module")
    assert main(["convert", str(tmp_path / "module"), "-o", str(tmp_path / "pyreft")]) == 0
    for act, same in (("linear", False), ("relu", True)):
        out = tmp_path / f"back-{act}"
        assert main(["convert", str(tmp_path / "pyreft"), "-o", str(out), "--model", str(tiny_dir), "--act", act]) == 0
        back = load(out, load_model(str(tiny_dir))[0])
        assert back.reft_config.act == act
        with torch.no_grad():
            got = back(input_ids=IDS).logits
        if same:
            assert_close(got, want, f"imported with --act {act}")
        else:
            assert (got - want).abs().max() > 1e-2  # the wrong activation changes the output


FIXTURES = Path(__file__).parent / "fixtures" / "pyreft"


@pytest.mark.parametrize("case", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_folders_pyreft_wrote_give_pyreft_s_logits(case):
    """Folders and logits written by pyreft 0.1.0 itself (tests/fixtures/pyreft/make_fixtures.py): imported with the
    positions pyreft used, the tiny model gives pyreft's logits; the short prompt needs pyreft's rule to match."""
    folder = FIXTURES / case
    positions = json.loads((folder / "case.json").read_text())["positions"]
    expected = load_file(folder / "expected.safetensors")
    imported = load_pyreft(folder, tiny_model()[0], positions=positions)
    with torch.no_grad():
        logits = imported(input_ids=expected["input_ids"]).logits
        base = tiny_model()[0](input_ids=expected["input_ids"]).logits
    assert_close(logits, expected["logits"], f"{case} vs pyreft's logits")  # written by another process
    assert (base - expected["logits"]).abs().max() > 1e-2  # pyreft's interventions did change the output
    if case.endswith("-short"):
        paper = load_pyreft(folder, tiny_model()[0], positions=positions, short_prompts="paper")
        with torch.no_grad():
            assert (paper(input_ids=expected["input_ids"]).logits - expected["logits"]).abs().max() > 1e-3


def test_the_interventions_dtype_is_read_from_the_saved_tensors(tmp_path):
    wrapped = _trained("loreft", dtype="bfloat16")
    save_pyreft(wrapped, tmp_path / "p")
    assert load_pyreft(tmp_path / "p", tiny_model()[0]).reft_config.dtype == "bfloat16"
    assert load_pyreft(tmp_path / "p", tiny_model()[0], dtype="float32").reft_config.dtype == "float32"


def test_import_refuses_what_it_would_get_wrong(tmp_path, tiny_dir, capsys):
    """An untied folder without positions naming both groups (its last interventions would be dropped and its first
    ones run at the last token), and a collapsed R (pyreft's LoReFT trained with weight decay on R): clean errors."""
    from peftlab.cli import main

    save_pyreft(_trained("loreft", positions="f1+l2", share_weights=False), tmp_path / "untied")
    assert main(["convert", str(tmp_path / "untied"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir)]) == 2
    assert "two interventions per layer (untied" in capsys.readouterr().err
    save_pyreft(_trained("loreft"), tmp_path / "decayed")
    for path in (tmp_path / "decayed").glob("intkey_*.bin"):
        state = torch.load(path, weights_only=True)
        torch.save({**state, "rotate_layer": torch.zeros_like(state["rotate_layer"])}, path)
    assert main(["convert", str(tmp_path / "decayed"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir)]) == 2
    assert "weight decay on R" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
