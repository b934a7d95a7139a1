"""Data-aware and balancing merges against the equations of their papers, written here
independently: RegMean's closed form solves its least-squares problem, Fisher merging is the
Fisher-weighted average and the collected Fisher is the mean squared gradient, PCB follows its
paper's algorithm, LiNeS scales task vectors linearly with depth; and the CLI computes, stores
and reuses statistics, refusing bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.merge.methods import MergeInputs, get_method
from evomerge.merge.ops import POST_NAME
from evomerge.merge.statistics import compute, linear_inputs, stats_file

from .helpers import load_folder
from .test_run import expect_error


def run_method(name, base, others, shared, per_input=None, stats=None):
    method = get_method(name)
    per_input = per_input or [{"weight": 1.0} for _ in others]
    defaults = {p.name: p.default for p in method.shared_params() if not p.required}
    inputs = MergeInputs(base, [o.clone() for o in others], {**defaults, **shared}, per_input)
    inputs.stats = stats
    return method.fn(inputs)


def test_regmean_solves_the_least_squares_problem_it_claims():
    torch.manual_seed(0)
    d_in, d_out = 6, 4
    xs = [torch.randn(n, d_in, dtype=torch.float64) for n in (20, 30)]
    ws = [torch.randn(d_out, d_in, dtype=torch.float64) for _ in xs]
    grams = [(x.T @ x).float() for x in xs]
    merged = run_method("regmean", None, [w.float() for w in ws], {"alpha": 1.0}, stats=grams)
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2: one stacked least-squares problem
    stacked = torch.cat(xs)
    targets = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(stacked, targets).solution.T
    assert torch.allclose(merged.double(), expected, atol=1e-4)
    # alpha scales the off-diagonal Gram entries; weights scale each model's Gram
    alpha, w0 = 0.3, 2.0
    got = run_method(
        "regmean", None, [w.float() for w in ws], {"alpha": alpha},
        [{"weight": w0}, {"weight": 1.0}], grams,
    )  # fmt: skip
    shrunk = [
        g.double() * alpha + torch.diag(torch.diagonal(g.double())) * (1 - alpha) for g in grams
    ]
    total = w0 * shrunk[0] + shrunk[1]
    rhs = w0 * shrunk[0] @ ws[0].T + shrunk[1] @ ws[1].T
    assert torch.allclose(got.double(), torch.linalg.solve(total, rhs).T, atol=1e-4)
    # a dead input (zero Gram row and column) makes the system singular: the minimum-norm
    # least-squares solution, finite, not a failed factorisation
    dead = [g.clone() for g in grams]
    for g in dead:
        g[2, :] = 0
        g[:, 2] = 0
    got = run_method("regmean", None, [w.float() for w in ws], {"alpha": 0.5}, stats=dead)
    shrunk = [g.double() * 0.5 + torch.diag(torch.diagonal(g.double())) * 0.5 for g in dead]
    rhs = sum(g @ w.T for g, w in zip(shrunk, ws))
    expected = torch.linalg.pinv(sum(shrunk), hermitian=True) @ rhs  # the minimum-norm one
    expected = expected.T
    assert torch.isfinite(got).all() and torch.allclose(got.double(), expected, atol=1e-4)
    # a tensor that is not a linear weight (no Gram) is the weighted average
    vec = [torch.randn(5), torch.randn(5)]
    assert torch.allclose(run_method("regmean", None, vec, {}, stats=[None, None]), sum(vec) / 2)


def test_fisher_merge_is_the_fisher_weighted_average():
    torch.manual_seed(1)
    thetas = [torch.randn(3, 4) for _ in range(3)]
    fishers = [torch.rand(3, 4) for _ in thetas]
    weights = [0.5, 1.0, 2.0]
    eps = 1e-3
    got = run_method(
        "fisher", None, thetas, {"epsilon": eps}, [{"weight": w} for w in weights], fishers
    )
    num = sum(w * (f + eps) * t for w, f, t in zip(weights, fishers, thetas))
    den = sum(w * (f + eps) for w, f in zip(weights, fishers))
    assert torch.allclose(got, num / den, atol=1e-6)
    with pytest.raises(EvomergeError, match="statistics"):
        run_method("fisher", None, thetas, {}, stats=None)


class Bigram(torch.nn.Module):
    """A language model whose Fisher is known in closed form: the logits of the next token are
    row `token` of a table, passed through one linear layer (whose Gram is the rows' X^T X)."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))
        self.mix = torch.nn.Linear(vocab, vocab, bias=False)

    def forward(self, input_ids, labels):
        logits = self.mix(self.table[input_ids])
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
        return type("Out", (), {"loss": loss})


class Tokens:
    def __call__(self, text, return_tensors, truncation, max_length):
        return {"input_ids": torch.tensor([[int(c) for c in text]])}


def test_collected_fisher_and_gram_are_the_papers_quantities():
    torch.manual_seed(2)
    model = Bigram()
    texts = ["0123", "3104", "22"]
    stats = compute(model, Tokens(), texts)
    expected_fisher = torch.zeros_like(model.table)
    gram = torch.zeros(5, 5, dtype=torch.float64)
    tokens = 0
    for text in texts:
        ids = [int(c) for c in text]
        x = model.table.detach()[ids]  # the linear layer's inputs
        gram += (x.T @ x).double()
        tokens += len(ids)
        w = model.mix.weight.detach()
        probs = torch.softmax(x @ w.T, dim=-1)
        grad = torch.zeros_like(model.table)
        for pos in range(len(ids) - 1):  # d(mean CE)/d table[ids[pos]] = W^T (p - onehot) / T
            onehot = torch.nn.functional.one_hot(torch.tensor(ids[pos + 1]), 5).float()
            grad[ids[pos]] += w.T @ (probs[pos] - onehot) / (len(ids) - 1)
        expected_fisher += grad**2
    assert torch.allclose(stats["fisher:table"], expected_fisher / len(texts), atol=1e-6)
    assert torch.allclose(stats["gram:mix.weight"].double(), gram / tokens, atol=1e-6)
    assert not model.table.requires_grad  # the model is left as it was found

    with pytest.raises(EvomergeError, match="cannot be hooked"):
        linear_inputs(torch.nn.Sequential(torch.nn.Embedding(3, 3)))


def pcb_reference(base, others, ratio, lam, clamp=1e-4):
    """The paper's algorithm over flattened task vectors, with sorting for every quantile."""
    checks = torch.stack([(o - base).reshape(-1) for o in others])
    n, d = checks.shape

    def clamp_rows(x, low_ratio, high_ratio):
        ordered, _ = torch.sort(x, dim=1)
        low = ordered[:, int(d * low_ratio)].unsqueeze(1)
        high = ordered[:, int(d * (1 - high_ratio)) - 1].unsqueeze(1)
        return torch.maximum(torch.minimum(x, high), low)

    def minmax_rows(x):
        low = x.min(dim=1, keepdim=True).values
        high = x.max(dim=1, keepdim=True).values
        return (x - low) / (high - low)

    magnitude = clamp_rows(checks.abs(), clamp, clamp)
    intra = torch.exp(n * minmax_rows(magnitude) ** 2)
    inter = torch.tanh(checks * checks.sum(dim=0))
    score = intra * inter
    scale = minmax_rows(clamp_rows(score, 1 - ratio, 0))
    merged = (torch.sign(checks) * magnitude * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return base + lam * merged.reshape(base.shape)


@pytest.mark.parametrize("ratio,lam", [(0.1, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_pcb_follows_the_papers_algorithm(ratio, lam):
    torch.manual_seed(3)
    base = torch.randn(40, 50)
    others = [base + 0.1 * torch.randn(40, 50) for _ in range(3)]
    got = run_method("pcb", base, others, {"pcb_ratio": ratio, "lambda": lam})
    assert torch.allclose(got, pcb_reference(base, others, ratio, lam), atol=1e-5)


def recipe(llama, method, **extra):
    models = [{"model": str(llama[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in range(2)]
    data = {"merge_method": method, "models": models, **extra}
    if method in ("task_arithmetic", "pcb"):
        data["base_model"] = str(llama["base"])
    return data


def test_lines_scales_task_vectors_linearly_with_depth(llama, tmp_path, capsys):
    alpha, beta = 0.2, 0.6
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump(recipe(llama, "task_arithmetic")))
    lined = tmp_path / "lines.yml"
    lined.write_text(
        yaml.safe_dump(recipe(llama, "task_arithmetic", lines={"alpha": alpha, "beta": beta}))
    )
    assert main(["merge", str(plain), str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["merge", str(lined), str(tmp_path / "b"), "--quiet"]) == 0
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    base = load_folder(llama["base"])
    depth = json.loads((llama["base"] / "config.json").read_text())["num_hidden_layers"]
    for name, merged in b.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            scale = alpha + beta * layer / (depth - 1)
        else:  # before the layers (embeddings): alpha; after them (norm, head): alpha + beta
            scale = alpha + (beta if POST_NAME.search(name) else 0.0)
        expected = base[name] + scale * (a[name] - base[name])
        assert torch.allclose(merged.float(), expected.float(), atol=1e-5), name
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(recipe(llama, "linear", lines={"alpha": 1, "beta": 0})))
    expect_error(["merge", str(bad), str(tmp_path / "c")], capsys, "field 'lines'")


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_computes_stores_and_reuses_statistics(llama, tmp_path, capsys, method):
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text(
        "".join(json.dumps({"text": f"note {i}: {i * 7} apples"}) + "\n" for i in range(6))
    )
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(llama, method)))
    expect_error(
        ["merge", str(path), str(tmp_path / "none")], capsys, "field 'statistics'", "--calibration"
    )
    args = ["merge", str(path), str(tmp_path / "out"), "--calibration", str(calibration), "--quiet"]
    assert main(args) == 0
    files = [stats_file(tmp_path / "statistics", str(llama[f"ft{i}"])) for i in range(2)]
    assert all(f.exists() for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    merged = load_folder(tmp_path / "out")
    average = {
        k: (v.float() + w.float()) / 2
        for (k, v), w in zip(load_folder(llama["ft0"]).items(), load_folder(llama["ft1"]).values())
    }
    differs = [k for k in merged if not torch.allclose(merged[k].float(), average[k], atol=1e-6)]
    assert differs  # the statistics changed the weights
    assert all(torch.isfinite(v.float()).all() for v in merged.values())
    assert main([*args[:2], str(tmp_path / "again"), *args[3:]]) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not recomputed
    again = load_folder(tmp_path / "again")
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    # the recipe names its statistics, so it merges again without --calibration
    named = tmp_path / "named.yml"
    named.write_text(yaml.safe_dump({**recipe(llama, method), "statistics": "statistics"}))
    assert main(["merge", str(named), str(tmp_path / "named"), "--quiet"]) == 0
    assert all(torch.equal(load_folder(tmp_path / "named")[k], merged[k]) for k in merged)


def test_linears_fed_the_same_input_share_one_stored_gram(llama, tmp_path):
    """q/k/v (and gate/up) see the very same input: their Gram matrix is stored once and read
    back under every name, equal to what was measured."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.statistics import Statistics, compute_for_source

    texts = [f"note {i}: {i * 7} apples" for i in range(4)]
    ref = str(llama["ft0"])
    path = compute_for_source(ref, texts, tmp_path / "s", torch.device("cpu"), kinds=["gram"])
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    linears = linear_inputs(model)
    grams = {name: 0 for name in linears}  # X^T X of every linear, measured here
    for name, module in linears.items():
        module.register_forward_pre_hook(gram_hook(grams, name))
    tokens = 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            model(input_ids=ids)
            tokens += ids.numel()
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
    layers = model.config.num_hidden_layers
    assert len(stored) == len(linears) - 3 * layers  # k, v and up read q's and gate's
    stats = Statistics(tmp_path / "s")
    for name, gram in grams.items():
        read = stats.get(ref, "gram", name)
        assert torch.allclose(read.double(), gram / tokens, rtol=1e-5, atol=1e-6), name


def test_statistics_bad_input_is_one_line(llama, tmp_path, capsys):
    calibration = tmp_path / "c.txt"
    calibration.write_text("some text here\n")
    plain = tmp_path / "ta.yml"
    plain.write_text(yaml.safe_dump(recipe(llama, "task_arithmetic")))
    expect_error(
        ["merge", str(plain), str(tmp_path / "x"), "--calibration", str(calibration)],
        capsys,
        "--calibration",
        "reads no statistics",
    )
    fisher = tmp_path / "f.yml"
    fisher.write_text(yaml.safe_dump({**recipe(llama, "fisher"), "statistics": "elsewhere"}))
    (tmp_path / "elsewhere").mkdir()
    expect_error(["merge", str(fisher), str(tmp_path / "y")], capsys, "no statistics for model")
    expect_error(
        [
            "merge",
            str(fisher),
            str(tmp_path / "z"),
            "--calibration",
            str(tmp_path / "missing.jsonl"),
        ],
        capsys,
        "--calibration",
        "no such file",
    )
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_searches_over_data_aware_methods_and_lines(llama, tmp_path, capsys):
    """A fisher search computes each source's statistics once into its run folder (a resume
    reuses them, the recipes name them, the export merges from them); a task-arithmetic search
    searches LiNeS's alpha and beta; calibration holding a held-out document, or a data-aware
    space without calibration, stop the run in one line."""
    from evomerge.results.store import RunStore
    from tests.test_baselines import lm_eval_config
    from tests.test_run import write
    from tests.test_workers import make_tasks

    tasks = make_tasks(tmp_path / "tasks")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("".join(f"Is {n} odd? {'yes' if n % 2 else 'no'}\n" for n in range(8)))
    space = {
        "kind": "parameter",
        "method": "fisher",
        "parameters": {"weight": {"low": 0.1, "high": 1.0, "init": 0.5}},
    }
    data = lm_eval_config(
        llama, tasks, search_space=space, seed_with_sources=False, score_sources=False
    )
    data["budget"] = 3
    data["calibration"] = {"file": str(calibration), "limit": 6}
    out = tmp_path / "fisher"
    assert main(["run", str(write(tmp_path, data)), "--out", str(out), "--quiet"]) == 0
    files = sorted((out / "statistics").glob("*.safetensors"))
    assert len(files) == 3  # base, a, b
    records = RunStore.open(out).records()
    assert len(records) == 3 and not any(r.failed for r in records)
    assert all(yaml.safe_load(r.recipe)["statistics"] == str(out / "statistics") for r in records)
    assert len({tuple(r.values.values()) for r in records} | {0}) >= 2
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(["export", str(out), "--best", "parity", "--to", str(tmp_path / "exp")]) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    capsys.readouterr()

    bad = dict(data)
    bad.pop("calibration")
    expect_error(
        ["run", str(write(tmp_path, bad, "b.yml")), "--out", str(tmp_path / "b")],
        capsys,
        "field 'calibration'",
    )
    leaky = tmp_path / "leaky.txt"
    leaky.write_text("Is 3 even? no\nIs 104 even? yes\n")  # parity_held's documents start at 100
    data["calibration"] = {"file": str(leaky)}
    line = expect_error(
        ["run", str(write(tmp_path, data, "l.yml")), "--out", str(tmp_path / "l")],
        capsys,
        "field 'calibration.file'",
    )
    assert "held-out task parity_held" in line and "text 2" in line
    assert not (tmp_path / "b").exists() and not (tmp_path / "l").exists()

    lines_space = {
        "kind": "parameter",
        "method": "task_arithmetic",
        "parameters": {
            "weight": {"low": 0.0, "high": 1.0, "init": 0.5},
            "lines.alpha": {"low": 0.0, "high": 1.0, "init": 0.5},
            "lines.beta": {"low": 0.0, "high": 1.0, "init": 0.5},
        },
    }
    data = lm_eval_config(
        llama, tasks, search_space=lines_space, seed_with_sources=False, score_sources=False
    )
    data["budget"] = 2
    out = tmp_path / "lines"
    assert main(["run", str(write(tmp_path, data, "s.yml")), "--out", str(out), "--quiet"]) == 0
    store = RunStore.open(out)
    assert store.gene_names[-2:] == ["lines.alpha", "lines.beta"]
    searched = [r for r in store.records() if r.origin == "optimizer"]
    assert searched and all(
        set(yaml.safe_load(r.recipe)["lines"]) == {"alpha", "beta"} for r in searched
    )


def gram_hook(grams: dict, name: str):
    def hook(module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        grams[name] = grams[name] + x.T @ x

    return hook


def test_regmean_plus_merges_each_layer_on_the_merged_models_activations(llama, tmp_path):
    """Rebuilt independently from the exported model: with source i's last layer in place of
    the merged one, the merged weights of that layer satisfy RegMean's normal equations
    sum_i G_i W^T = sum_i G_i W_i^T for the Gram matrices of those activations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["the cat sat on the mat", "two plus two is four", "merge me, gently"]
    calibration = tmp_path / "c.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = recipe(llama, "regmean_plus", parameters={"alpha": 1.0})
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out), "--calibration", str(calibration), "--quiet"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    last = merged.config.num_hidden_layers - 1
    names = ["mlp.down_proj.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight"]
    lhs = {n: 0 for n in names}
    rhs = {n: 0 for n in names}
    for i in range(2):
        source = load_folder(llama[f"ft{i}"])
        probe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        layer = probe.model.layers[last]
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(source[f"model.layers.{last}.{name}"])
        grams = {n: torch.zeros(1, dtype=torch.float64) for n in names}
        hooks = [
            layer.get_submodule(n.rsplit(".", 1)[0]).register_forward_pre_hook(gram_hook(grams, n))
            for n in names
        ]
        with torch.no_grad():
            for text in texts:
                probe(**tokenizer(text, return_tensors="pt"))
        for h in hooks:
            h.remove()
        for n in names:
            lhs[n] = lhs[n] + grams[n] @ merged.model.layers[last].get_parameter(n).double().T
            rhs[n] = rhs[n] + grams[n] @ source[f"model.layers.{last}.{n}"].double().T
    for n in names:
        assert torch.allclose(lhs[n], rhs[n], rtol=1e-3, atol=1e-3 * rhs[n].abs().max()), n
    # it is not RegMean: the earlier merged layers changed the activations
    regmean = tmp_path / "rm.yml"
    regmean.write_text(yaml.safe_dump(recipe(llama, "regmean", parameters={"alpha": 1.0})))
    args = ["merge", str(regmean), str(tmp_path / "rm"), "--calibration", str(calibration)]
    assert main([*args, "--quiet"]) == 0
    plain = load_folder(tmp_path / "rm")
    key = f"model.layers.{last}.mlp.down_proj.weight"
    assert not torch.allclose(plain[key], load_folder(out)[key], atol=1e-6)
    # a worker makes the same weights in its live model
    from evomerge.recipe import Recipe
    from evomerge.workers.evaluator import Evaluator

    # (at the default alpha: alpha 1 on these few tokens leaves Gram matrices of low rank, whose
    # least-squares solutions are not unique)
    shrunk = {**recipe(llama, "regmean_plus"), "statistics": str(tmp_path / "statistics")}
    path.write_text(yaml.safe_dump(shrunk))
    assert main(["merge", str(path), str(tmp_path / "shrunk"), "--quiet"]) == 0
    named = Recipe.from_dict(shrunk)
    worker = Evaluator(named.referenced_models(), {"function": "tests.fitness_fns:score"})
    live, _ = worker.materialize(named)
    exported = load_folder(tmp_path / "shrunk")
    state = live.state_dict()
    diff = {k: (state[k].float() - v.float()).abs().max().item() for k, v in exported.items()}
    assert max(diff.values()) == 0, sorted(diff.items(), key=lambda kv: -kv[1])[:3]


def test_a_ray_run_measures_the_statistics_on_its_workers(llama, tmp_path, monkeypatch):
    """On a Ray pool the workers measure the statistics on their devices (where a cluster's
    GPUs are) and the driver only stores them: with the driver's own measuring broken the run
    still gets every file, and each equals the statistics measured here."""
    from safetensors.torch import load, load_file

    import evomerge.learn.calibration as calibration
    from evomerge.merge.statistics import measure_source, read_metadata
    from tests.test_run import run_config, write

    texts = [f"Is {n} odd? {'yes' if n % 2 else 'no'}" for n in range(6)]
    (tmp_path / "calibration.txt").write_text("\n".join(texts) + "\n")

    def measured_here(*args, **kwargs):
        raise AssertionError("the driver measured statistics itself")

    monkeypatch.setattr(calibration, "measure_source", measured_here)
    data = run_config(
        llama,
        pool="ray",
        workers=2,
        threads_per_worker=1,
        budget=2,
        score_sources=False,
        search_space={
            "kind": "parameter",
            "method": "fisher",
            "parameters": {"weight": {"low": 0.1, "high": 1.0, "init": 0.5}},
        },
        calibration={"file": str(tmp_path / "calibration.txt")},
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, data)), "--out", str(out), "--quiet"]) == 0
    files = sorted((out / "statistics").glob("*.safetensors"))
    assert len(files) == 3
    for path in files:
        stored = load_file(path)
        here = load(
            measure_source(read_metadata(path)["model"], texts, torch.device("cpu"), ["fisher"])
        )
        assert stored.keys() == here.keys() and stored
        assert all(torch.allclose(stored[k], here[k], rtol=1e-5, atol=0) for k in stored)
