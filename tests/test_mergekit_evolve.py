"""mergekit-evolve's configs run as they are: the genome becomes a search space of the genes
mergekit-evolve searches (per layer group, per model, per filter), each genome merging to
mergekit-evolve's own merge of it; its flags map to the run; `--print-config` shows the
equivalent evomerge run config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.merge.engine import merge_to_disk
from evomerge.search.prepare import prepare

from .helpers import load_folder
from .test_workers import make_tasks


def evolve_config(m, **genome) -> dict:
    return {
        "genome": {
            "models": [str(m["ft0"]), str(m["ft1"]), str(m["ft2"])],
            "merge_method": "ties",
            "base_model": str(m["base"]),
            "layer_granularity": 2,
            "filters": ["self_attn"],
            **genome,
        },
        "tasks": [{"name": "parity_fit", "weight": 2.0}],
        "limit": 8,
    }


def print_config(tmp_path, capsys, config: dict, *flags) -> dict:
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--print-config", *map(str, flags)]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def mergekit_genes(genome) -> list[str]:
    """mergekit-evolve's genes in its own order ([group, model, filter set, parameter]), named
    as evomerge names them."""
    from mergekit.evo.genome import METHOD_PARAM_MAPS

    d = genome.definition
    groups = genome.num_layers // d.layer_granularity if d.layer_granularity > 0 else 1
    names = []
    for g in range(groups):
        for model in d.models:
            for f in [*(d.filters or []), "rest"]:
                for p in METHOD_PARAM_MAPS[d.merge_method]:
                    short = model.model.path.rstrip("/").rsplit("/", 1)[-1]
                    name = f"{short}.{p}[{f}]" if d.filters else f"{short}.{p}"
                    names.append(f"{name}@{g}" if groups > 1 else name)
    return names


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, genome",
    [
        ("ties", {}),  # discrete layer groups: slices of their own, filters
        ("ties", {"smooth": True, "filters": None}),  # a gradient over the groups
        ("dare_ties", {}),  # genes and start only: DARE's random masks are each tool's own
        ("task_arithmetic", {"allow_negative_weights": True, "layer_granularity": 0}),
        ("linear", {"normalize": False}),
    ],
)
def test_genome_searches_mergekit_evolves_genes_and_merges_as_it_does(
    llama, tmp_path, capsys, method, genome
):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = evolve_config(llama, merge_method=method, **genome)
    if method == "linear":
        config["genome"].pop("base_model")
    tasks = make_tasks(tmp_path / "tasks")
    data = print_config(tmp_path, capsys, config, "--task-search-path", tasks)
    _, space = prepare(RunConfig.from_dict(data))
    theirs = ModelGenome(ModelGenomeDefinition.model_validate(config["genome"]))
    order = mergekit_genes(theirs)
    assert sorted(space.gene_names()) == sorted(order)
    assert len(order) == theirs.initial_genotype().numel()
    # the start is mergekit-evolve's: weights 1/M, densities 1
    ours_at = dict(zip(space.gene_names(), space.initial()))
    start = theirs.initial_genotype().reshape(-1).numpy()
    assert np.allclose([ours_at[n] for n in order], start)
    if method == "dare_ties":
        return

    low, high = space.bounds()
    x = np.random.default_rng(3).uniform(low, high)
    at = dict(zip(space.gene_names(), x))
    # both in fp32: mergekit-evolve's `dtype: bfloat16` is mergekit's compute dtype, where
    # evomerge computes in fp32 and writes bfloat16 (docs/migrating.md gives the difference)
    recipe = space.decode(x)
    assert recipe.dtype == "bfloat16"
    merge_to_disk(recipe.model_copy(update={"dtype": "float32"}), tmp_path / "ours", progress=False)
    genotype = np.array([at[n] for n in order], dtype=np.float32)
    given = theirs.genotype_merge_config(genotype).model_dump(mode="json", exclude_none=True)
    run_merge(
        MergeConfiguration.model_validate({**given, "dtype": "float32"}),
        out_path=str(tmp_path / "theirs"),
        options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False),
    )
    ours, mk = load_folder(tmp_path / "ours"), load_folder(tmp_path / "theirs")
    assert sorted(ours) == sorted(mk)
    for name, tensor in mk.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_flags_and_fields_map_to_the_run(llama, tmp_path, capsys):
    config = evolve_config(llama, smooth=True)
    config.update(num_fewshot=2, random_init=True, apply_chat_template=False)
    data = print_config(
        tmp_path, capsys, config,
        "--max-fevals", 12, "--sigma0", 0.3, "--force-population-size", 4, "--random-seed", 5,
        "--batch-size", 2, "--num-gpus", 3, "--task-search-path", tmp_path,
        "--i-understand-the-depths-of-the-evils-i-am-unleashing", "--strategy", "serial",
    )  # fmt: skip
    assert data["budget"] == 12 and data["seed"] == 5 and data["workers"] == 3
    assert data["pool"] == "local" and data["allow_benchmark_fitness"] is True
    assert data["optimizer"] == {
        "name": "cma", "options": {"sigma": 0.3, "population_size": 4, "random_start": True}
    }  # fmt: skip
    assert data["objectives"] == [{"name": "score", "weights": {"parity_fit: acc,none": 2.0}}]
    fitness = data["fitness"]
    assert fitness["tasks"] == ["parity_fit"] and fitness["include_path"] == str(tmp_path)
    assert (fitness["limit"], fitness["num_fewshot"], fitness["batch_size"]) == (8, 2, 2)
    assert fitness["apply_chat_template"] is False
    space = data["search_space"]
    assert space["layer_groups"] == 2 and space["layer_shape"] == "gradient"
    assert space["fixed"] == {"normalize": True} and space["dtype"] == "bfloat16"
    assert set(data["models"]) == {"llama_base", "llama_ft0", "llama_ft1", "llama_ft2"}


def test_random_init_starts_at_a_seeded_random_point(llama, tmp_path, capsys):
    from evomerge.search.prepare import optimizer_for

    config = evolve_config(llama)
    config["random_init"] = True
    tasks = make_tasks(tmp_path / "tasks")
    data = print_config(tmp_path, capsys, config, "--task-search-path", tasks)
    resolved, space = prepare(RunConfig.from_dict(data))
    first, again = optimizer_for(resolved, space), optimizer_for(resolved, space)
    assert np.array_equal(first.x0, again.x0)  # resumable: the same start every time
    assert not np.allclose(first.x0, space.initial())
    low, high = space.bounds()
    assert np.all((low <= first.x0) & (first.x0 <= high))


def test_a_mergekit_evolve_config_runs_and_resumes(llama, tmp_path, capsys):
    tasks = make_tasks(tmp_path / "tasks")
    path = tmp_path / "evolve.yml"
    config = evolve_config(llama, layer_granularity=0, filters=None)
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    argv = ["run", str(path), "--max-fevals", "3", "--task-search-path", str(tasks),
            "--strategy", "serial", "--storage-path", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "the equivalent evomerge run config" in capsys.readouterr().err
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["evaluations"] == 3, status.keys()
    # the run folder holds the evomerge config: resume needs nothing of mergekit-evolve's
    assert main(["resume", str(out), "--quiet"]) == 0


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"merge_method": "della"}, "mergekit-evolve does not search 'della'"),
        ({"base_model": None}, "ties needs a base model"),
        ({"layer_granularity": 3}, "3 does not divide the models' 4 layers"),
        ({"merge_method": "slerp", "filters": None}, "slerp merges two models, got 3"),
    ],
)
def test_bad_genomes_fail_in_one_line(llama, tmp_path, capsys, change, needle):
    config = evolve_config(llama)
    config["genome"].update(change)
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_evolve_flags_on_an_evomerge_config_are_refused(tmp_path, capsys):
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump({"models": {"a": "x"}}))
    assert main(["run", str(path), "--max-fevals", "5"]) == 2
    assert "--max-fevals: applies to mergekit-evolve configs" in capsys.readouterr().err
