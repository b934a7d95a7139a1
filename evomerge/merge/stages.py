"""Multi-stage merges in mergekit-multi's format: one YAML file of `---`-separated merge configs,
each named but the last (the output); a later stage names an earlier one as a model.

Earlier stages never touch disk: each is planned once and seen by the stages that read it as a
model whose tensors are merged when fetched (`MergedSource`), so the final merge streams through
the whole chain tensor by tensor, in the memory of one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.io import ModelSource
from evomerge.merge.nested import MergedSource
from evomerge.merge.ops import MergePlan
from evomerge.merge.plan import build_plan
from evomerge.recipe import Recipe, read_recipe_file


class Stages:
    """The stages of a multi-stage file, in an order where each comes after what it reads."""

    def __init__(self, named: dict[str, Recipe], final: Recipe, source: str = "recipe") -> None:
        self.named, self.final, self.source = named, final, source
        self.order = _dependency_order(named, final, source)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "recipe") -> Stages:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise EvomergeError(f"{source}: not valid YAML{at}") from None
        if not docs:
            raise EvomergeError(f"{source}: holds no merge config")
        named: dict[str, Recipe] = {}
        final: Optional[Recipe] = None
        for i, doc in enumerate(docs):
            where = f"{source} (stage {i + 1} of {len(docs)})"
            if not isinstance(doc, dict):
                raise EvomergeError(f"{where}: expected a mapping with 'merge_method' at the top")
            recipe = Recipe.from_dict(doc, source=where)
            if recipe.name is None:
                if final is not None:
                    raise EvomergeError(
                        f"{where}: field 'name' is missing; every stage but the final one "
                        "needs a name (the final one is the output)"
                    )
                final = recipe
            elif recipe.name in named:
                raise EvomergeError(f"{where}: field 'name': {recipe.name!r} names two stages")
            else:
                named[recipe.name] = recipe
        if final is None:
            if len(docs) > 1:
                raise EvomergeError(
                    f"{source}: every stage has a name; leave the final one (the output) unnamed"
                )
            final = next(iter(named.values()))  # one named config: a plain recipe
            named = {}
        return cls(named, final, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Stages:
        return cls.from_yaml_text(read_recipe_file(path), source=str(path))

    @property
    def single(self) -> bool:
        return not self.named

    def to_yaml(self) -> str:
        """The file again: the named stages in dependency order, then the output."""
        docs = [self.named[name].to_yaml() for name in self.order] + [self.final.to_yaml()]
        return "---\n".join(docs)

    def to_mergekit_yaml(self) -> str:
        docs = [self._mergekit(self.named[name], name) for name in self.order]
        return "---\n".join([*docs, self.final.to_mergekit_yaml()])

    @staticmethod
    def _mergekit(recipe: Recipe, name: str) -> str:
        return f"name: {name}\n" + recipe.to_mergekit_yaml()

    def referenced_models(self) -> list[str]:
        """The models the stages read from outside the file, each once."""
        refs: dict[str, None] = {}
        for recipe in [*self.named.values(), self.final]:
            for ref in reads(recipe):
                if ref not in self.named:
                    refs[ref] = None
        return list(refs)

    def plan(
        self,
        *,
        allow_pickle: bool = False,
        sources: Optional[dict[str, ModelSource]] = None,
        search_dirs: Iterable = (),
    ) -> MergePlan:
        """The output stage's plan, each earlier stage planned once and read as a model."""
        opened = dict(sources or {})
        dirs = list(search_dirs)
        for name in self.order:
            try:
                inner = build_plan(
                    self.named[name], allow_pickle=allow_pickle, sources=opened, search_dirs=dirs
                )
            except EvomergeError as exc:
                raise EvomergeError(f"{self.source}: stage {name!r}: {exc}") from None
            if inner.method.layerwise or inner.method.learned:
                inner.close()
                raise EvomergeError(
                    f"{self.source}: stage {name!r}: {inner.method.name} merges a whole model at "
                    "once and cannot feed a later stage; merge it on its own and name its folder"
                )
            opened.update(inner.sources)  # one reader per checkpoint for the whole chain
            opened[name] = MergedSource(name, inner)
        try:
            return build_plan(
                self.final, allow_pickle=allow_pickle, sources=opened, search_dirs=dirs
            )
        except EvomergeError as exc:
            if self.single:
                raise
            raise EvomergeError(f"{self.source}: the final stage: {exc}") from None


def reads(recipe: Recipe) -> list[str]:
    """Every model a stage reads, its tokenizer's source included."""
    refs = recipe.referenced_models()
    tokenizer = recipe.tokenizer_source
    if tokenizer not in (None, "base", "union") and tokenizer not in refs:
        refs.append(tokenizer)
    return refs


def _dependency_order(named: dict[str, Recipe], final: Recipe, source: str) -> list[str]:
    """Named stages ordered so that each follows the stages it reads; a cycle is refused.
    Stages the output does not reach are kept too (mergekit-multi merges them all)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise EvomergeError(f"{source}: the stages read each other in a circle ({cycle})")
        state[name] = "open"
        for ref in reads(named[name]):
            if ref in named:
                visit(ref, [*path, name])
        state[name] = "done"
        order.append(name)

    for ref in reads(final):
        if ref in named:
            visit(ref, [])
    for name in named:
        visit(name, [])
    return order
