"""The population manager: ask the optimizer, dispatch, commit, tell, checkpoint; and resume.

Every candidate carries its ask index. Before dispatching one, the store is asked whether that
index with that genome was already scored (a resumed run re-asks what it had asked before the
crash): if so the stored result is told and nothing is re-scored. Results are committed to the
store before the optimizer is told, and the optimizer is checkpointed after every tell (a restored
optimizer re-asks exactly what it had asked since),
so a SIGKILL at any moment loses nothing committed and repeats only what was in flight. With
one worker the candidate sequence of a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import replace
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from evomerge.baselines import baseline_recipes
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import ensure_statistics
from evomerge.learn.in_run import ensure_learned
from evomerge.optim.registry import Candidate, Evaluation, Optimizer
from evomerge.results.store import Record, genome_key
from evomerge.results.tracking import MlflowTracker
from evomerge.search.racing import Race, Racer
from evomerge.search.records import MISSING_METRIC, objective_values, recipe_key, to_record
from evomerge.search.references import score_held_out, score_references, source_recipe
from evomerge.search.run import BASELINE, Run
from evomerge.workers.evaluator import Outcome
from evomerge.workers.pool import Pool

log = logging.getLogger("evomerge")


def drive(run: Run, pool: Pool, progress: bool = True) -> None:
    """Run until the budget is spent; safe to kill at any moment and call again."""
    tracker = None
    try:
        tracker = MlflowTracker.for_run(run)
        ensure_statistics(run.folder, run.config, run.space, pool)
        config = run.config
        baselines = baseline_recipes(
            config.baselines, config.models, config.base_model, config.seed
        )
        ensure_learned(run.folder, config, baselines, run.space, progress, pool)
        score_references(run, pool, progress)
        if tracker is not None:
            tracker.start(run.store.records())
        SearchLoop(run, pool, progress, tracker).run_to_budget()
        if getattr(run.config.fitness, "held_out", None) is not None:
            score_held_out(run, pool, progress)
    except BaseException:
        if tracker is not None:
            tracker.finish("KILLED")
        raise
    else:
        if tracker is not None:
            tracker.finish()
    finally:
        pool.close()


class SearchLoop:
    """The manager loop as named steps: restore the optimizer, then until the budget is spent
    dispatch candidates (replaying ones the store already holds, reusing identical merges) and
    record each result (commit, then tell, then checkpoint)."""

    def __init__(
        self,
        run: Run,
        pool: Pool,
        progress: bool = True,
        tracker: Optional[MlflowTracker] = None,
    ) -> None:
        self.run, self.pool, self.store = run, pool, run.store
        self.tracker = tracker
        records = self.store.records()
        # scored before a restart, keyed by (ask index, genome): told again, never re-scored
        self.replayable = {
            (r.index, genome_key(r.genome)): r
            for r in records
            if r.origin in ("optimizer", "source", "baseline")
        }
        self.sources = self.store.sources()
        self.baselines = self.store.baselines()
        self.scored: dict[str, Record] = {}  # merge identity -> the evaluation that scored it
        for r in records:
            if not r.failed and r.reused_from is None:
                self.scored.setdefault(recipe_key(r.recipe), r)
        self.racer, self.pending = self.restore_races(records)
        self.racing: dict[int, tuple[Candidate, Race]] = {}  # index -> its race, in the pool
        self.done = len(self.replayable)
        self.failing: list[str] = []  # errors of the evaluations failed in a row just now
        self.optimizer, self.sequence = self.restore()
        self.queue: deque[Candidate] = deque(self.optimizer.pending())
        self.bar = tqdm(
            total=run.config.budget,
            initial=min(self.done, run.config.budget),
            desc="evaluations",
            unit="eval",
            disable=not progress,
            dynamic_ncols=True,
        )

    def restore_races(self, records: list[Record]) -> tuple[Optional[Racer], dict[int, Race]]:
        """Racing state from the store: every stage result committed or saved between stages
        (the promotion windows), and the races a crash cut short (finished on re-ask)."""
        plan = self.run.document_plan
        if plan is None:
            return None, {}
        fitness = self.run.config.fitness
        racer = Racer(fitness.fidelity, plan, self.run.config.objectives)
        committed = {r.index for r in records}
        for r in records:
            if r.stages and r.reused_from is None:
                racer.know(
                    Race.from_json(
                        {
                            "index": r.index,
                            "genome_key": genome_key(r.genome),
                            "recipe": r.recipe,
                            "stages": r.stages,
                            "documents": r.per_document or {},
                        }
                    )
                )
        pending = {}
        for index, data in self.store.races().items():
            if index not in committed:
                pending[index] = Race.from_json(data)
                racer.know(pending[index])
        for result in [*self.sources.values(), *self.baselines.values()]:
            racer.know_reference(result.per_document)
        return racer, pending

    def restore(self) -> tuple[Optimizer, int]:
        """The optimizer as last checkpointed (a fresh one before the first tell), and the
        checkpoint's sequence number."""
        optimizer = self.run.new_optimizer()
        checkpoint = self.store.load_checkpoint()
        if checkpoint is None:
            return optimizer, 0
        optimizer.load_state_dict(checkpoint[0])
        return optimizer, checkpoint[1]

    def run_to_budget(self) -> None:
        try:
            while True:
                self.dispatch()
                if self.pool.in_flight() == 0:
                    break
                for candidate, recipe, outcome in self.pool.wait():
                    self.receive(candidate, recipe, outcome)
        finally:
            self.bar.close()

    # ----- dispatch ----------------------------------------------------------------------------
    def room(self) -> int:
        """How many more candidates to hand to the pool now: a generational optimizer's whole
        generation (the pool queues what its workers cannot start yet, so none idles while the
        generation has work), a steady-state one's as many as workers are free (each new
        candidate then learns from the newest results); never past the budget."""
        open_now = len(self.racing) if self.racer else self.pool.in_flight()
        left = self.run.config.budget - self.done - open_now
        return left if self.optimizer.generational else min(left, self.pool.free())

    def dispatch(self) -> None:
        while (room := self.room()) > 0:
            if not self.queue:
                asked = self.optimizer.ask(room)  # no checkpoint: restored, it asks these again
                if not asked:
                    return  # a generation waits for its results
                self.queue.extend(asked)
            candidate = self.queue.popleft()
            if self.replay(candidate) or self.resume_race(candidate):
                continue
            if self.reuse_source(candidate):
                continue
            seed = self.run.candidate_seed(candidate.index)
            recipe_yaml = self.run.space.decode(candidate.genome, seed).to_yaml()
            if self.reuse(candidate, recipe_yaml):
                continue
            if self.racer is not None:
                race = Race(candidate.index, genome_key(candidate.genome), recipe_yaml)
                self.next_stage(candidate, race)
            else:
                self.pool.submit(candidate, recipe_yaml)

    def replay(self, candidate: Candidate) -> bool:
        """A re-asked candidate the store already holds is told from the store."""
        stored = self.replayable.pop((candidate.index, genome_key(candidate.genome)), None)
        if stored is None:
            return False
        self.tell(candidate, stored)
        return True

    def reuse_source(self, candidate: Candidate) -> bool:
        """A seed is a source model or baseline the run scored before the search: its score is
        committed again, with the recipe that was scored, not re-made."""
        label = self.run.seed_source(candidate.index)
        if label is None:
            return False
        if label.startswith(BASELINE):
            name, origin = label.removeprefix(BASELINE), "baseline"
            scored = self.baselines.get(name)
            recipe = scored.recipe if scored else None
        else:
            name, origin = label, "source"
            scored = self.sources.get(name)
            recipe = source_recipe(self.run.config.models[name])
        if scored is None or scored.failed or recipe is None:
            return False
        per_example = scored.per_example
        if self.racer is not None:  # the first stage's documents, as every candidate has
            per_example = self.racer.per_example(scored.per_document or {})
        record = Record(
            index=candidate.index,
            genome=candidate.genome,
            recipe=recipe,
            values=scored.values,
            metrics=scored.metrics,
            per_example=per_example,
            worker=f"{origin} {name}",
            origin=origin,
        )
        self.commit(record)
        self.tell(candidate, record)
        return True

    def reuse(self, candidate: Candidate, recipe_yaml: str) -> bool:
        """A merge identical to one already scored is committed with that score, not re-scored."""
        twin = self.scored.get(recipe_key(recipe_yaml))
        if twin is None:
            return False
        record = replace(
            twin,
            index=candidate.index,
            genome=candidate.genome,
            seconds=0.0,
            worker="",  # no worker scored it: reused_from names the evaluation that was
            origin=self.origin_of(candidate.index),
            reused_from=twin.index,
        )
        self.commit(record)
        self.tell(candidate, record)
        return True

    # ----- racing ------------------------------------------------------------------------------
    def next_stage(self, candidate: Candidate, race: Race) -> None:
        """Send a racing candidate to be scored on the documents its next stage adds."""
        assert self.run.document_plan is not None
        self.racing[candidate.index] = (candidate, race)
        docs = self.run.document_plan.new_docs(len(race.stages))
        self.pool.submit(candidate, race.recipe, docs=docs)

    def resume_race(self, candidate: Candidate) -> bool:
        """A re-asked candidate whose race a crash cut short goes on from its last stage."""
        race = self.pending.get(candidate.index)
        if race is None or race.genome_key != genome_key(candidate.genome) or not race.stages:
            return False
        del self.pending[candidate.index]
        if race.stages[-1].promoted:
            self.next_stage(candidate, race)
        else:
            self.finish_race(candidate, race)
        return True

    def receive(self, candidate: Candidate, recipe: str, outcome: Outcome) -> None:
        """A result from the pool: a racing stage, or a whole evaluation."""
        if self.racer is None or candidate.index not in self.racing:
            self.record(candidate, recipe, outcome)
            return
        race = self.racing[candidate.index][1]
        if outcome.error is None and outcome.per_document is None:
            outcome = replace(outcome, error="the fitness gave no per-document results to race")
        if outcome.error is not None:
            if not race.stages:  # the first stage failed: the candidate failed
                del self.racing[candidate.index]
                self.record(candidate, recipe, outcome)
                return
            log.warning("candidate #%d failed a later stage (%s)", candidate.index, outcome.error)
            race.stages[-1].promoted = False  # it ends where it got to
            self.finish_race(candidate, race)
            return
        stage = self.racer.add_stage(
            race, outcome.per_document, self.values_of, outcome.seconds, outcome.worker
        )
        if stage.values is None:  # a metric the objectives need is missing: a failed record
            del self.racing[candidate.index]
            self.record(candidate, recipe, replace(outcome, metrics=stage.metrics))
            return
        self.store.set_race(candidate.index, race.to_json())  # before any further step
        if stage.promoted:
            self.next_stage(candidate, race)
        else:
            self.finish_race(candidate, race)

    def values_of(self, metrics: dict[str, float]) -> Optional[dict[str, float]]:
        return objective_values(self.run.config.objectives, metrics)[0]

    def finish_race(self, candidate: Candidate, race: Race) -> None:
        """Commit a candidate whose race ended, with what racing tells for it, then tell."""
        assert self.racer is not None
        self.racing.pop(candidate.index, None)
        last = race.stages[-1]
        record = Record(
            index=candidate.index,
            genome=candidate.genome,
            recipe=race.recipe,
            values=self.racer.told(race, self.values_of),
            metrics=last.metrics,
            per_example=self.racer.per_example(race.documents),
            seconds=sum(s.seconds for s in race.stages),
            worker=last.worker,
            stages=race.to_json()["stages"],
            final=len(race.stages) == self.racer.plan.n_stages,
            per_document=race.documents,
        )
        self.settle(candidate, record)

    # ----- results -----------------------------------------------------------------------------
    def record(self, candidate: Candidate, recipe: str, outcome: Outcome) -> None:
        """Commit a scored candidate, then tell the optimizer (never the other way round)."""
        self.settle(candidate, to_record(self.run.config.objectives, candidate, recipe, outcome))

    def settle(self, candidate: Candidate, record: Record) -> None:
        """Label a seed's record, commit it, then tell the optimizer and watch for failures."""
        record.origin = self.origin_of(candidate.index)
        self.commit(record)
        if not record.failed:  # (a reuse is committed in reuse(), never here)
            self.scored.setdefault(recipe_key(record.recipe), record)
        self.bar.set_postfix_str(_postfix(record), refresh=False)
        if record.error and record.error.startswith(MISSING_METRIC):
            raise EvomergeError(f"field 'objectives': {record.error}")
        self.tell(candidate, record)
        self.fail_fast(record)

    def origin_of(self, index: int) -> str:
        """ "source" or "baseline" for a seed that stands for one, else "optimizer"."""
        label = self.run.seed_source(index)
        if label is None:
            return "optimizer"
        return "baseline" if label.startswith(BASELINE) else "source"

    def fail_fast(self, record: Record) -> None:
        """Stop a run whose evaluations keep failing, before it spends its budget on them; what
        was committed stays, and the run resumes once the cause is fixed."""
        self.failing = self.failing + [record.error] if record.failed else []
        if len(self.failing) < self.run.config.max_consecutive_failures:
            return
        error, count = Counter(self.failing).most_common(1)[0]
        raise EvomergeError(
            f"{len(self.failing)} evaluations in a row failed ({count} with: {error}); fix the "
            f"cause, then continue with `evomerge resume {self.run.folder}`"
        )

    def commit(self, record: Record) -> None:
        self.store.commit(record)
        self.done += 1
        self.bar.update(1)
        if self.tracker is not None:
            self.tracker.log(record)

    def tell(self, candidate: Candidate, record: Record) -> None:
        self.optimizer.tell(
            Evaluation(
                candidate.index,
                candidate.genome,
                self.run.losses(record),
                None if record.per_example is None else np.asarray(record.per_example),
            )
        )
        self.checkpoint()

    def checkpoint(self) -> None:
        """After every tell: a restored optimizer re-asks exactly what it asked since."""
        self.sequence += 1
        self.store.save_checkpoint(self.optimizer.state_dict(), self.sequence)


def _postfix(record: Record) -> str:
    if record.values is None:
        return f"#{record.index} failed"
    return f"#{record.index} " + " ".join(f"{k}={v:.4g}" for k, v in record.values.items())
