"""The real zoo: expert adapters shipped as low-rank factors and folded into SmolLM2, its
chat-templated tasks, and a scaled-down demo run on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.zoo import lora
from evomerge.zoo.real import EXPERTS, SKILLS, SYSTEM, RealZooSettings, chat_text, splits

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parent.parent


def test_folded_factors_give_the_adapted_model(llama, tmp_path):
    """A checkpoint made by folding the saved factors computes what the trained adapter did."""
    from transformers import AutoModelForCausalLM

    adapted = AutoModelForCausalLM.from_pretrained(llama["base"])
    factors = lora.attach(adapted, rank=4, alpha=8.0, seed=1)
    with torch.no_grad():
        for b in factors[1::2]:
            b.normal_(0, 0.05)  # as if trained
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = adapted(ids).logits
    saved = lora.detach(adapted, dtype=torch.float32)
    lora.save_factors(saved, tmp_path / "x.safetensors", {"skill": "x"})
    folded = AutoModelForCausalLM.from_pretrained(llama["base"])
    assert lora.apply_factors(folded, tmp_path / "x.safetensors") == 3 * len(folded.model.layers)
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, expected, atol=1e-4)
        assert not torch.allclose(adapted(ids).logits, expected, atol=1e-4)  # detached: the base


def test_new_words_fold_into_their_embedding_rows_only(llama, tmp_path):
    """An expert's letters are embedding rows learned alone: folding them changes those rows,
    by exactly the saved deltas, and nothing else."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama["base"])
    before = model.get_input_embeddings().weight.detach().clone()
    delta = torch.randn_like(before) * 0.01
    rows = lora.row_delta("model.embed_tokens.weight", [3, 17], delta)
    lora.save_factors(rows, tmp_path / "w.safetensors", {"skill": "x"})
    assert lora.apply_factors(model, tmp_path / "w.safetensors") == 1
    after = model.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 17]
    assert torch.allclose(after[[3, 17]] - before[[3, 17]], delta[[3, 17]], atol=1e-4)


def test_training_and_scoring_splits_are_disjoint():
    data = splits(RealZooSettings())
    for task, parts in data.items():
        keys = {name: {e.prompt for e in examples} for name, examples in parts.items()}
        names = list(keys)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not keys[a] & keys[b], (task, a, b)


def test_no_expert_trains_on_a_target_and_read_never_sees_a_sum():
    from evomerge.zoo.real import TARGETS
    from evomerge.zoo.tasks import LETTERS

    data = splits(RealZooSettings())
    targets = {e.prompt for t in TARGETS for part in data[t].values() for e in part}
    for skill in SKILLS:
        assert not {e.prompt for e in data[skill]["train"]} & targets, skill
    read = [e.prompt for part in ("train", "train_letters") for e in data["read"][part]]
    assert not any("+" in p for p in read)
    assert not any(c in LETTERS for e in data["read"]["train"] for c in e.prompt)  # digits
    assert all(any(c in LETTERS for c in e.prompt) for e in data["read"]["train_letters"])
    assert all(any(c in LETTERS for c in e.prompt) for e in data["read"]["test"])


def test_the_shipped_tasks_are_the_generated_ones(tmp_path):
    """fitness/smollm2 is what `evomerge zoo real` writes (nothing edited by hand)."""
    from evomerge.zoo.real import write_tasks

    shipped = REPO / "fitness" / "smollm2"
    for name in write_tasks(tmp_path, RealZooSettings()):
        for suffix in (".yaml", ".jsonl"):
            written = (tmp_path / f"{name}{suffix}").read_text()
            assert (shipped / f"{name}{suffix}").read_text() == written, name


def test_training_prompts_are_what_lm_eval_scores(smollm, monkeypatch):
    """The experts learn on exactly the context lm-eval builds with the chat template."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm)
    model = AutoModelForCausalLM.from_pretrained(smollm)
    folder = REPO / "fitness" / "smollm2"
    monkeypatch.chdir(folder)  # the tasks' data files are relative to their folder
    tasks = TaskManager(include_path=str(folder)).load(["sm2_add_fit", "sm2_dec_add_gen_fit"])
    results = evaluate(
        lm=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        task_dict=tasks,
        limit=2,
        apply_chat_template=True,
        system_instruction=SYSTEM,
        bootstrap_iters=0,
        log_samples=True,
        verbosity="ERROR",
    )
    for samples in results["samples"].values():
        for sample in samples:
            assert sample["arguments"][0][0] == chat_text(tokenizer, sample["doc"]["prompt"])
    assert "exact_match,none" in results["results"]["sm2_dec_add_gen_fit"]


@pytest.fixture(scope="module")
def real_zoo(smollm, tmp_path_factory):
    from evomerge.zoo.real import build_real_zoo

    if not all((EXPERTS / f"{s}.safetensors").is_file() for s in SKILLS):
        pytest.skip("no expert factors shipped")
    out = tmp_path_factory.mktemp("zoo")
    return build_real_zoo(out / "models", out / "tasks", base=smollm), out / "tasks"


def test_a_scaled_down_demo_is_measured_against_sources_and_baselines(real_zoo, tmp_path, capsys):
    """The demo config on the real zoo, scaled down: sources and baselines are scored on the
    fitness and held-out tasks, and status --json sets the Pareto set against them."""
    models, tasks = real_zoo
    config = yaml.safe_load((REPO / "search_spaces" / "examples" / "demo_run.yaml").read_text())
    config["models"] = {name: str(models[name]) for name in config["models"]}
    config["search_space"]["dataflow"]["models"] = ["merged", "add"]
    config.update(budget=3, baselines=["task_arithmetic"], pool="local")
    config["optimizer"]["options"] = {"population_size": 4}
    config["fitness"].update(include_path=str(tasks), limit=4, batch_size=8)
    config["fitness"]["fidelity"] = {"stages": [2, "full"], "promote": 0.5, "window": 2}
    config["fitness"]["held_out"].update(limit=4)
    config["fitness"]["held_out"]["tasks"] = ["sm2_cy_add_heldout", "sm2_add_gen_heldout"]
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "demo.yaml"), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["sources"]) == {"base", "add", "read"} and set(data["baselines"]) == {
        "task_arithmetic"
    }
    held = data["baselines"]["task_arithmetic"]["held_out"]
    assert {"sm2_cy_add_heldout: acc,none", "sm2_add_gen_heldout: exact_match,none"} <= set(held)
    assert data["pareto"] and all(p["held_out"] for p in data["pareto"])
