"""Optimizers improve on known functions and restore exactly from saved state."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.optim.m2n2 import M2N2
from evomerge.optim.registry import OPTIMIZERS, Evaluation, make_optimizer
from evomerge.optim.state import read_state, write_state

DIM = 6
SHIFT = np.linspace(-0.4, 0.5, DIM)
LOWER, UPPER, X0 = -np.ones(DIM), np.ones(DIM), np.full(DIM, 0.9)
FAST = {"map": {"generations": 20}, "nested_map": {"generations": 10, "stage_budget": 12}}


def sphere(x):
    return float(np.sum((x - SHIFT) ** 2))


def niches(x):
    """Per-example scores: example j is solved as x_j nears SHIFT_j (the M2N2 view)."""
    return np.exp(-20 * (x - SHIFT) ** 2)


def drive(opt, steps, batch=2, start=None):
    asked = []
    for _ in range(steps):
        for c in opt.ask(batch):
            asked.append(c.genome.copy())
            per = niches(c.genome)
            opt.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome)]), per))
    return asked


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_improves_on_shifted_sphere(name):
    options = {"m2n2": {"mutation_sigma": 0.05}, **FAST}.get(name, {})
    opt = make_optimizer(name, options, LOWER, UPPER, X0, 1, seed=3)
    asked = drive(opt, 400 if name in ("cma", "sep_cma") else 100)
    values = [sphere(x) for x in asked]
    assert min(values) < 0.5 * sphere(X0), name
    if name in ("cma", "sep_cma"):
        assert min(values) < 1e-6  # CMA-ES solves it


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restored_optimizer_asks_the_same_points(name, tmp_path):
    one = make_optimizer(name, FAST.get(name, {}), LOWER, UPPER, X0, 1, seed=5)
    drive(one, 7, batch=3)
    pending = one.ask(2)  # asked, not told: must survive the restart
    write_state(tmp_path / "s.npz", one.state_dict())
    two = make_optimizer(name, FAST.get(name, {}), LOWER, UPPER, X0, 1, seed=5)
    two.load_state_dict(read_state(tmp_path / "s.npz"))
    assert [c.index for c in two.pending()] == [c.index for c in pending]
    for opt in (one, two):
        for c in opt.pending():
            opt.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome)]), niches(c.genome)))
    after_one, after_two = drive(one, 6, batch=3), drive(two, 6, batch=3)
    assert all(np.array_equal(a, b) for a, b in zip(after_one, after_two))
    assert len(after_one) == len(after_two) > 0


def test_multi_objective_support_is_explicit():
    for name in ("nsga2", "pymoo_nsga2", "tpe", "random", "m2n2"):
        make_optimizer(name, {}, LOWER, UPPER, X0, 2, seed=0)
    for name in ("cma", "sep_cma"):
        with pytest.raises(EvomergeError, match="optimises one objective"):
            make_optimizer(name, {}, LOWER, UPPER, X0, 2, seed=0)


@pytest.mark.parametrize("name", ["nsga2", "pymoo_nsga2"])
def test_nsga2_finds_a_spread_front(name):
    opt = make_optimizer(name, {"population_size": 8}, LOWER, UPPER, X0, 2, seed=1)
    points = []
    for _ in range(20):
        for c in opt.ask(8):
            f = np.array([np.sum((c.genome - 0.5) ** 2), np.sum((c.genome + 0.5) ** 2)])
            points.append(f)
            opt.tell(Evaluation(c.index, c.genome, f))
    points = np.array(points)
    late = points[-16:]
    assert late.sum(axis=1).mean() < points[:8].sum(axis=1).mean()  # closer to the front
    assert np.ptp(late[:, 0]) > 0.1  # not collapsed onto one end


def two_bowls(x: np.ndarray) -> np.ndarray:
    return np.array([np.sum((x - 0.5) ** 2), np.sum((x + 0.5) ** 2)])


def test_pymoo_nsga2_fills_every_free_worker_and_matches_optunas_front():
    """With four candidates always in flight (a free worker asks as soon as one result is in),
    pymoo_nsga2 never answers an ask with nothing, and after the same 160 evaluations its front
    is at least as good as Optuna's NSGA-II, which waits for whole generations."""
    from evomerge.results.pareto import hypervolume, non_dominated

    fronts = {}
    for name in ("nsga2", "pymoo_nsga2"):
        opt = make_optimizer(name, {"population_size": 8}, LOWER, UPPER, X0, 2, seed=2)
        flight, points, empty = list(opt.ask(4)), [], 0
        while len(points) < 160:
            if flight:
                c = flight.pop(0)
                f = two_bowls(c.genome)
                points.append(f)
                opt.tell(Evaluation(c.index, c.genome, f))
            asked = opt.ask(4 - len(flight))
            empty += not asked
            flight += asked
        if name == "pymoo_nsga2":
            assert empty == 0
        losses = np.array(points)
        fronts[name] = hypervolume(losses[non_dominated(losses)], np.array([12.0, 12.0]))
    assert fronts["pymoo_nsga2"] >= 0.98 * fronts["nsga2"], fronts


def test_pymoo_nsga2_breeds_no_duplicates_of_what_it_holds():
    """A child equal to a parent or to a member waiting to survive is bred again (with six genes
    about one child in twenty leaves crossover and mutation unchanged): a duplicate would be
    served from the store, its worker's place in the generation left idle."""
    opt = make_optimizer("pymoo_nsga2", {"population_size": 4}, LOWER, UPPER, X0, 1, seed=0)
    seen = []
    for _ in range(10):
        for c in opt.ask(4):
            seen.append(c.genome.tobytes())
            opt.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome)])))
    assert len(set(seen)) == len(seen)


def test_pymoo_nsga2_breeds_at_most_one_generation_ahead():
    """Asked with nothing told, it hands out generation 0 and generation 1 (bred from nothing
    yet: sampled) and then waits: a slow evaluation never lets it breed far ahead of its
    parents. Telling generation 0 lets generation 2 be asked."""
    opt = make_optimizer("pymoo_nsga2", {"population_size": 4}, LOWER, UPPER, X0, 1, seed=0)
    asked = opt.ask(20)
    assert len(asked) == 8 and opt.ask(1) == []
    for c in asked[:4]:
        opt.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome)])))
    assert [c.index for c in opt.ask(20)] == [8, 9, 10, 11]


def test_bad_optimizer_names_and_options():
    with pytest.raises(EvomergeError, match="did you mean 'cma'"):
        make_optimizer("cmaa", {}, LOWER, UPPER, X0, 1, 0)
    with pytest.raises(EvomergeError, match="optimizer.options.sigmaa"):
        make_optimizer("cma", {"sigmaa": 1}, LOWER, UPPER, X0, 1, 0)
    with pytest.raises(EvomergeError, match="archive_size"):
        make_optimizer("m2n2", {"archive_size": 1}, LOWER, UPPER, X0, 1, 0)


# ----- M2N2 mechanics ----------------------------------------------------------------------------
def m2n2(**kw) -> M2N2:
    return M2N2(np.zeros(2), np.ones(2), np.zeros(2), 1, 0, archive_size=3, **kw)


def test_competition_keeps_the_only_solver_of_a_rare_example():
    opt = m2n2()
    generalist = np.array([1, 1, 1, 0, 0.0])
    for k in range(3):
        opt.add(np.full(2, k / 10), generalist)
    specialist = np.array([0, 0, 0, 1, 1.0])  # solves what nobody else does
    opt.add(np.array([0.9, 0.9]), specialist)
    assert any(np.array_equal(s, specialist) for s in opt.scores)
    redundant = np.array([1, 1, 1, 0, 0.0])
    before = opt.scores.copy()
    opt.add(np.array([0.5, 0.5]), redundant)  # adds nothing new: dropped or swapped for a twin
    assert sorted(map(tuple, opt.scores)) == sorted(map(tuple, before))
    # without competition (alpha = 0) the specialist is the weakest member and goes first
    ga = m2n2(alpha=0.0)
    for k in range(3):
        ga.add(np.full(2, k / 10), generalist)
    ga.add(np.array([0.9, 0.9]), specialist)
    assert not any(np.array_equal(s, specialist) for s in ga.scores)


def test_attraction_picks_the_complementary_partner():
    opt = m2n2()
    opt.add(np.array([0.1, 0.1]), np.array([1, 1, 0, 0.0]))
    opt.add(np.array([0.2, 0.2]), np.array([1, 1, 0, 0.0]))
    opt.add(np.array([0.9, 0.9]), np.array([0, 0, 1, 1.0]))
    for _ in range(30):
        first, second = opt.parents()
        if first in (0, 1):
            assert second == 2  # the only member that covers what the first misses


def test_degenerate_archives_do_not_crash():
    opt = m2n2()
    for k in range(3):  # nobody solves anything: all fitness and attraction are zero
        opt.add(np.full(2, k / 3), np.zeros(4))
    for _ in range(10):
        first, second = opt.parents()
        assert first != second
        assert np.all((opt.child() >= 0) & (opt.child() <= 1))


# ----- MAP ----------------------------------------------------------------------------------
def two_tasks(c):
    """Accuracies that are sigmoids of quadratics in the merge coefficients (MAP's model)."""
    a = 1 / (1 + np.exp(-(3 * c[0] - 1.5 * c[1] ** 2 - 2 * c[0] ** 2 + 0.5)))
    b = 1 / (1 + np.exp(-(3 * c[1] - 1.5 * c[0] ** 2 - 2 * c[1] ** 2 + 0.5)))
    return np.array([-a, -b])


@pytest.mark.parametrize("bayesian", [False, True])
def test_map_recovers_the_surrogates_and_proposes_the_front(bayesian):
    opt = make_optimizer(
        "map", {"bayesian": bayesian}, np.zeros(2), np.ones(2), np.full(2, 0.5), 2, seed=0
    )
    told = []
    while len(told) < 30:
        batch = opt.ask(4)
        assert batch, "MAP stalled"
        for c in batch:
            f = two_tasks(c.genome)
            told.append((c.genome, f))
            opt.tell(Evaluation(c.index, c.genome, f))
    grid = np.array([[i, j] for i in np.linspace(0, 1, 41) for j in np.linspace(0, 1, 41)])
    truth = np.array([two_tasks(x) for x in grid])
    models = opt.surrogates()
    predicted = np.column_stack([m(grid) for m in models])
    assert np.abs(predicted - truth).max() < 1e-3
    proposed = np.array([f for x, f in told[opt.n_design + opt.n_adaptive :]])
    from evomerge.results.pareto import non_dominated

    true_front = truth[non_dominated(truth)]
    gaps = [np.min(np.linalg.norm(true_front - p, axis=1)) for p in proposed]
    assert np.median(gaps) < 0.01  # the verified points sit on the true front


def test_map_refuses_genomes_it_cannot_model():
    with pytest.raises(EvomergeError, match="quadratic terms"):
        make_optimizer("map", {}, -np.ones(20), np.ones(20), np.zeros(20), 2, 0)


def test_nested_map_merges_pairwise_towards_the_preference():
    def three(c):  # task k is best near c_k = 1, and hurt by the other coefficients
        return np.array(
            [-(1 / (1 + np.exp(-(4 * c[k] - 2 * np.sum(c**2) + 2 * c[k] ** 2)))) for k in range(3)]
        )

    opt = make_optimizer(
        "nested_map", {"stage_budget": 16}, np.zeros(3), np.ones(3), np.full(3, 0.5), 3, seed=0
    )
    seen = []
    while len(seen) < 48:
        batch = opt.ask(4)
        assert batch, "nested MAP stalled"
        for c in batch:
            seen.append(c.genome)
            opt.tell(Evaluation(c.index, c.genome, three(c.genome)))
    assert opt.stage == 2
    assert opt.anchor[0] > 0.1 and opt.anchor[1] > 0.1 and opt.anchor[2] == 0  # models 0 and 1
    assert any(g[2] > 0 for g in seen[32:])  # the last stage brings in model 2


@pytest.mark.parametrize("name", ["nsga2", "tpe"])
def test_optuna_checkpoints_stay_flat_and_restore_exactly(name, tmp_path, monkeypatch):
    """Told trials go to frozen chunks written once: a checkpoint after 96 tells is about the
    size of one after 32, and the optimizer restored from it asks what the original asks."""
    from evomerge.optim import optuna_samplers

    monkeypatch.setattr(optuna_samplers, "CHUNK", 8)
    options = {"population_size": 4} if name == "nsga2" else {"n_startup_trials": 4}
    one = make_optimizer(name, options, LOWER, UPPER, X0, 1, seed=5)
    sizes = {}
    for told in range(8, 97, 8):
        drive(one, 2, batch=4)
        path = tmp_path / f"optimizer-{told:03d}.npz"
        write_state(path, one.state_dict())
        sizes[told] = path.stat().st_size
    parts = sorted(tmp_path.glob("part-*.npz"))
    assert len(parts) >= 96 // 8 - 1  # one per full chunk of told trials, each written once
    assert sizes[96] < 1.3 * sizes[32], sizes  # the whole history would be three times larger

    two = make_optimizer(name, options, LOWER, UPPER, X0, 1, seed=5)
    two.load_state_dict(read_state(tmp_path / "optimizer-096.npz"))
    after_one, after_two = drive(one, 4, batch=4), drive(two, 4, batch=4)
    assert all(np.array_equal(a, b) for a, b in zip(after_one, after_two))


def test_cma_covariance_is_written_once_per_generation(tmp_path):
    """A 300-gene CMA-ES: its 720 kB covariance is a part written when the generation changes;
    the checkpoints written after each tell in between stay small and reuse it."""
    dim = 300
    one = make_optimizer(
        "cma", {"population_size": 6}, -np.ones(dim), np.ones(dim), np.zeros(dim), 1, seed=2
    )
    for c in one.ask(6):
        one.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome[:DIM])])))
    asked = one.ask(6)
    for n, c in enumerate(asked[:4]):  # mid-generation: four checkpoints, one covariance
        one.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome[:DIM])])))
        write_state(tmp_path / f"optimizer-{n}.npz", one.state_dict())
    parts = list(tmp_path.glob("part-*.npz"))
    assert len(parts) == 1 and parts[0].stat().st_size > dim * dim * 8
    assert all(p.stat().st_size < 60_000 for p in tmp_path.glob("optimizer-*.npz"))
    two = make_optimizer(
        "cma", {"population_size": 6}, -np.ones(dim), np.ones(dim), np.zeros(dim), 1, seed=2
    )
    two.load_state_dict(read_state(tmp_path / "optimizer-3.npz"))
    for opt in (one, two):
        for c in opt.pending():
            opt.tell(Evaluation(c.index, c.genome, np.array([sphere(c.genome[:DIM])])))
    assert all(np.array_equal(a.genome, b.genome) for a, b in zip(one.ask(6), two.ask(6)))
