"""`evomerge merge`: outputs that load; bad input fails in one line with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evomerge.cli import main

from .helpers import load_folder, write_recipe


def ties_recipe(m, **extra) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft0"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(m["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        **extra,
    }


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_sharded_output_loads_in_transformers(llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path, ties_recipe(llama, dtype="bfloat16"))
    code, err = run_cli(
        capsys, "merge", recipe, tmp_path / "out", "--shard-size", "60KB", "--quiet"
    )
    assert code == 0, err
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("merge me", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits.float()).all()
    assert (out / "evomerge_recipe.yaml").exists() and (out / "mergekit_config.yml").exists()


def test_slices_update_depth_and_per_layer_config(families, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    m = families["qwen2"]
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(m["base"]), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(m["ft0"]), "layer_range": [1, 4]}]},
            ],
        },
    )
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "deep", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "deep")
    assert len(model.model.layers) == 6
    src = load_folder(m["ft0"])
    out = load_folder(tmp_path / "deep")
    assert torch.equal(
        out["model.layers.3.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"]
    )


def test_existing_output_needs_force_and_is_replaced_whole(llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, ties_recipe(llama))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run_cli(capsys, "merge", recipe, out, "--quiet")
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, err = run_cli(capsys, "merge", recipe, out, "--quiet", "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


BAD_RECIPES = {
    "missing model": (
        lambda m, t: {
            **ties_recipe(m),
            "models": [{"model": str(t / "nope"), "parameters": {"weight": 1.0}}],
        },
        "no such folder",
    ),
    "unknown method": (lambda m, t: {**ties_recipe(m), "merge_method": "tiez"}, "unknown method"),
    "unknown parameter": (
        lambda m, t: {**ties_recipe(m), "parameters": {"densty": 0.5}},
        "unknown parameter",
    ),
    "density above 1": (
        lambda m, t: {**ties_recipe(m), "parameters": {"density": 1.5}},
        "must be in (0, 1]",
    ),
    "density zero": (
        lambda m, t: {**ties_recipe(m), "parameters": {"density": [0.5, 0.0]}},
        "must be in (0, 1]",
    ),
    "slerp with three": (
        lambda m, t: {
            "merge_method": "slerp",
            "base_model": str(m["base"]),
            "parameters": {"t": 0.5},
            "models": [{"model": str(m[k])} for k in ("base", "ft0", "ft1")],
        },
        "exactly 2",
    ),
    "nearswap with three": (
        lambda m, t: {
            "merge_method": "nearswap",
            "base_model": str(m["base"]),
            "parameters": {"t": 0.01},
            "models": [{"model": str(m[k])} for k in ("base", "ft0", "ft1")],
        },
        "exactly 2",
    ),
    "arcee_fusion without its base": (
        lambda m, t: {
            "merge_method": "arcee_fusion",
            "models": [{"model": str(m[k])} for k in ("ft0", "ft1")],
        },
        "needs a base_model",
    ),
    "nearswap without t": (
        lambda m, t: {
            "merge_method": "nearswap",
            "base_model": str(m["base"]),
            "models": [{"model": str(m[k])} for k in ("base", "ft0")],
        },
        "'t' is required",
    ),
    "arcee_fusion with a parameter": (
        lambda m, t: {
            "merge_method": "arcee_fusion",
            "base_model": str(m["base"]),
            "parameters": {"density": 0.5},
            "models": [{"model": str(m[k])} for k in ("base", "ft0")],
        },
        "unknown parameter for arcee_fusion",
    ),
    "multislerp eps not a number": (
        lambda m, t: {
            "merge_method": "multislerp",
            "parameters": {"eps": "small"},
            "models": [{"model": str(m[k]), "parameters": {"weight": 1.0}} for k in ("ft0", "ft1")],
        },
        "eps",
    ),
    "missing weight": (
        lambda m, t: {
            "merge_method": "ties",
            "base_model": str(m["base"]),
            "models": [{"model": str(m["ft0"])}],
        },
        "'weight' is required",
    ),
    "unknown field": (lambda m, t: {**ties_recipe(m), "base_modle": "x"}, "unknown field"),
    "bad dtype": (lambda m, t: {**ties_recipe(m), "dtype": "float12"}, "unknown dtype"),
    "layer out of range": (
        lambda m, t: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(m["base"]), "layer_range": [2, 9]}]}],
        },
        "out of range",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2_nothing_written(llama, tmp_path, capsys, case):
    build, expected = BAD_RECIPES[case]
    recipe = write_recipe(tmp_path, build(llama, tmp_path))
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("evomerge: error:") and expected in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_mismatched_shapes_and_architectures(families, llama, tmp_path, capsys):
    from .family import make_family

    wide = make_family(tmp_path, "llama", n_finetunes=0, hidden=96, seed=5)["base"]
    big_vocab = make_family(tmp_path / "vocab", "llama", n_finetunes=0, seed=6, vocab=300)["base"]
    other_arch = families["mistral"]["ft0"]
    capsys.readouterr()  # the model builders' own progress output
    for intruder, expected in (
        (wide, "mismatched shapes"),
        (other_arch, "different architectures"),
        (big_vocab, "different vocabularies"),
    ):
        recipe = write_recipe(
            tmp_path,
            {
                **ties_recipe(llama),
                "models": [
                    {"model": str(llama["ft0"]), "parameters": {"weight": 0.5}},
                    {"model": str(intruder), "parameters": {"weight": 0.5}},
                ],
            },
        )
        code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet")
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def poisoned_copy(model, dest):
    """A copy of `model` with NaN and inf in one MLP weight, written as valid safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, dest)
    files = sorted(dest.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        name = next((n for n in tensors if "mlp.down_proj" in n), None)
        if name is not None:
            tensors[name][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
            save_file(tensors, file, metadata={"format": "pt"})
            return file, name
    raise AssertionError("no MLP weight found")


def test_nan_weights_are_refused_naming_the_file(llama, tmp_path, capsys):
    bad_file, name = poisoned_copy(llama["ft1"], tmp_path / "poisoned")
    half = {"weight": 0.5, "density": 0.5}
    recipe = write_recipe(
        tmp_path,
        {
            **ties_recipe(llama),
            "models": [
                {"model": str(llama["ft0"]), "parameters": half},
                {"model": str(tmp_path / "poisoned"), "parameters": half},
            ],
        },
    )
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert str(bad_file) in err and name in err and "3 NaN or infinite" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_not_yaml_and_not_a_file(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    assert run_cli(capsys, "merge", bad, tmp_path / "o")[0] == 2
    code, err = run_cli(capsys, "merge", tmp_path / "absent.yml", tmp_path / "o")
    assert code == 2 and "not found" in err


@pytest.fixture
def pickle_only(llama, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(llama["ft0"], folder)
    state = load_folder(folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_refused_unless_allowed(llama, pickle_only, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        {
            **ties_recipe(llama),
            "models": [
                {"model": str(pickle_only), "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": str(llama["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        },
    )
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet")
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "out").exists()
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet", "--allow-pickle")
    assert code == 0, err
    reference = write_recipe(tmp_path, ties_recipe(llama), "ref.yml")
    assert run_cli(capsys, "merge", reference, tmp_path / "ref", "--quiet")[0] == 0
    a, b = load_folder(tmp_path / "out"), load_folder(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_malicious_pickle_does_not_execute(llama, tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    shutil.copytree(llama["ft0"], folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Payload()}, fh)
    recipe = write_recipe(
        tmp_path,
        {**ties_recipe(llama), "models": [{"model": str(folder), "parameters": {"weight": 0.5}}]},
    )
    code, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--quiet", "--allow-pickle")
    assert code == 2 and "pickle" in err
    assert not marker.exists()
