"""The run config: what to merge, how to search, what to score. Validated before anything runs."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.baselines import BaselineSpec, normalize_baselines
from evomerge.errors import EvomergeError
from evomerge.recipe import describe_validation_error

NonEmpty = Annotated[str, Field(min_length=1)]


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    metric: Optional[str] = Field(default=None, min_length=1)  # e.g. "arith: acc,none"
    weights: Optional[dict[str, float]] = None  # or a weighted sum of metrics
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _one_source(self) -> Objective:
        if (self.metric is None) == (self.weights is None):
            raise ValueError("give exactly one of 'metric' or 'weights' (a weighted sum)")
        if self.weights is not None and not self.weights:
            raise ValueError("'weights' needs at least one metric")
        return self

    def metrics(self) -> list[str]:
        return [self.metric] if self.metric is not None else list(self.weights or {})

    def value(self, metrics: dict[str, float]) -> Optional[float]:
        """This objective's value from a fitness result, or None if a metric is missing."""
        if self.metric is not None:
            return metrics.get(self.metric)
        if any(m not in metrics for m in self.weights or {}):
            return None
        return sum(w * metrics[m] for m, w in (self.weights or {}).items())


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class PythonFitness(BaseModel):
    """`module:function(model, tokenizer) -> {metric: value}`, run in the worker."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["python"] = "python"
    function: str = Field(pattern=r"^[\w.]+:\w+$")
    options: dict[str, Any] = Field(default_factory=dict)  # passed as keyword arguments
    # the folder the module is imported from besides the current one: the run config's, when
    # the module sits next to it (set on load); on a cluster it is shipped to every node
    path: Optional[str] = None


class HeldOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)
    limit: Optional[int] = Field(default=None, gt=0)


class Fidelity(BaseModel):
    """Multi-fidelity racing (racing.py): document counts per task for each stage, the last
    one `full` or the largest; the best `promote` fraction of the latest `window` candidates
    at a stage go on to the next."""

    model_config = ConfigDict(extra="forbid")
    stages: list[Union[Annotated[int, Field(gt=0)], Literal["full"]]] = Field(min_length=2)
    promote: float = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=8, ge=2)
    # what a race that ends early is told: its stage mean shifted by the mean stage-to-final
    # change ("mean"), or an item-response estimate of its score on all documents ("irt")
    estimator: Literal["mean", "irt"] = "mean"

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: list) -> list:
        counts = stages[:-1] if stages[-1] == "full" else stages
        if "full" in counts:
            raise ValueError("'full' can only be the last stage")
        if any(b <= a for a, b in zip(counts, counts[1:])):
            raise ValueError(f"stages must increase, e.g. [16, 32, full]; got {stages}")
        return stages


class LmEvalFitnessSpec(BaseModel):
    """lm-eval tasks (registered names, or YAML+JSONL tasks in `include_path`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lm_eval"]
    tasks: list[str] = Field(min_length=1)
    include_path: Optional[str] = None
    limit: Optional[int] = Field(default=None, gt=0)  # first N documents of each task
    samples: Optional[dict[str, list[int]]] = None  # or fixed document ids per task
    batch_size: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = 8
    # few-shot examples: one count for every task, or {task: count}
    num_fewshot: Union[
        Annotated[int, Field(ge=0)], dict[str, Annotated[int, Field(ge=0)]], None
    ] = None
    # instruct models: prompts go through the tokenizer's chat template, with this system
    # message (None: the template's own default), few-shot examples as turns of the chat
    apply_chat_template: bool = False
    system_instruction: Optional[str] = None
    fewshot_as_multiturn: bool = False
    # generation settings for generate_until tasks (max_gen_toks, until, temperature, ...)
    gen_kwargs: Optional[dict[str, Any]] = None
    # scored only for the final Pareto set, so reported numbers are not the ones searched on
    held_out: Optional[HeldOut] = None
    # score candidates on growing document subsets and promote only the promising ones
    fidelity: Optional[Fidelity] = None

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> LmEvalFitnessSpec:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true")
        return self


def _fitness_kind(data: Any) -> str:
    kind = data.get("kind", "python") if isinstance(data, dict) else getattr(data, "kind", None)
    return kind if kind in ("python", "lm_eval") else "python"


class CalibrationSpec(BaseModel):
    """Text the data-aware methods (fisher, regmean) compute the sources' statistics on, and
    each source's own text that DAM distils it from (`files`, per model name)."""

    model_config = ConfigDict(extra="forbid")
    # JSONL with a "text" (or "prompt" and "target") field, or plain text lines: every source's
    file: Optional[NonEmpty] = None
    # model name -> its own text (the same formats); a source not named reads `file`
    files: dict[str, NonEmpty] = Field(default_factory=dict)
    limit: Optional[int] = Field(default=64, gt=0)  # the first N texts
    max_length: int = Field(default=256, gt=1)  # tokens per text

    @model_validator(mode="after")
    def _some_text(self) -> CalibrationSpec:
        if self.file is None and not self.files:
            raise ValueError("give 'file' (every source's text) or 'files' (per model name)")
        return self

    def file_for(self, model: str) -> Optional[str]:
        """The text file of source `model`: its own, else the shared one."""
        return self.files.get(model, self.file)


class LearningSpec(BaseModel):
    """How a run trains its learned merges (the dam / adamerging baselines, and the merge a
    search over a learned method tunes)."""

    model_config = ConfigDict(extra="forbid")
    steps: Optional[int] = Field(default=None, gt=0)  # default: one pass over the data
    lr: float = Field(default=1e-3, gt=0)  # Adam's learning rate
    batch_size: int = Field(default=8, gt=0)  # texts per step (DAM: per source)
    granularity: Literal["layer", "tensor"] = "layer"  # AdaMerging: one lambda per ...
    embeddings_and_norms: bool = False  # DAM: coefficients for those tensors too
    seed: int = 0  # the order texts are drawn in


class TrackingSpec(BaseModel):
    """Where evaluations are mirrored for experiment tracking (the run store stays the truth)."""

    model_config = ConfigDict(extra="forbid")
    # an MLflow tracking URI: sqlite:///mlflow.db, http(s)://server, or a folder (file store)
    mlflow: NonEmpty
    experiment: NonEmpty = "evomerge"


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    models: dict[str, NonEmpty] = Field(min_length=1)  # name -> local folder or hub name
    base_model: Optional[str] = None
    search_space: Union[str, dict[str, Any]]
    objectives: list[Objective] = Field(min_length=1)
    optimizer: OptimizerSpec
    budget: int = Field(gt=0)
    seed: int = 0
    fitness: Annotated[
        Union[
            Annotated[PythonFitness, Tag("python")], Annotated[LmEvalFitnessSpec, Tag("lm_eval")]
        ],
        Discriminator(_fitness_kind),
    ]
    pool: Literal["ray", "local"] = "ray"  # local: score in this process, one at a time
    # Ray actors; default: one per GPU of the cluster, else one per threads_per_worker CPUs
    workers: Optional[int] = Field(default=None, gt=0)
    threads_per_worker: Optional[int] = Field(default=None, gt=0)  # CPU actors; default 2
    # GPUs each worker reserves on a GPU cluster: 0.5 puts two small-model workers on a GPU;
    # 2 or more (whole) spreads one worker's live model over that many GPUs of a node
    gpus_per_worker: float = Field(default=1.0, gt=0)
    # seconds to wait for Ray to place every worker (and for it to load its sources) before the
    # run ends with what was asked and what the cluster has
    placement_timeout: float = Field(default=600.0, gt=0)
    # where a GPU worker keeps the source tensors: device, host (pinned, streamed to the device
    # tensor by tensor) or auto (the device when everything fits it with headroom)
    sources: Literal["auto", "device", "host"] = "auto"
    # a tensor larger than this (fp32, per input) is merged in row chunks where its method
    # merges entry by entry: bounds the merge temporaries; the weights are the same
    merge_chunk_mib: int = Field(default=256, gt=0)
    candidate_timeout: Optional[float] = Field(default=None, gt=0)  # seconds per candidate
    # stop (exit 2, resumable) after this many evaluations in a row failed: a broken fitness or
    # task must not spend the budget
    max_consecutive_failures: int = Field(default=10, gt=0)
    ray_address: Optional[str] = None  # or RAY_ADDRESS; default: a local Ray started by the run
    device: str = "auto"
    # the dtype every candidate, source and baseline is scored in (the merge math stays fp32);
    # default: the recipe's output dtype. bfloat16 halves CPU scoring time on CPUs with bf16
    score_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    store: Optional[str] = None  # None: SQLite under the run folder; or postgresql://...
    score_sources: bool = True  # score each source model first (report, hypervolume reference)
    # start the search from the source models the space can express (their scores reused), so a
    # run never ends below a model the user already had; false for ablations
    seed_with_sources: bool = True
    # another run folder whose scores of the same sources and baselines this run reuses, when
    # its fitness, objectives and score_dtype are this run's (a set of ablation runs scores
    # them once)
    references_from: Optional[str] = None
    # merges the search is measured against (presets or recipes), scored like the sources
    baselines: list[Union[str, BaselineSpec]] = Field(default_factory=list)
    reference: Optional[list[float]] = None  # hypervolume reference, one value per objective
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # search on a public benchmark's test split without held-out tasks (refused by default)
    allow_benchmark_fitness: bool = False
    tracking: Optional[TrackingSpec] = None
    calibration: Optional[CalibrationSpec] = None
    learning: Optional[LearningSpec] = None  # default: LearningSpec()'s settings
    # Hugging Face offline mode for the run's processes: true (local models and tasks only),
    # false (hub downloads allowed), or unset: as HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say
    offline: Optional[bool] = None

    @model_validator(mode="after")
    def _names(self) -> RunConfig:
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g}: above 1 a worker takes whole GPUs; "
                "use 0 < x <= 1 to share a GPU, or a whole number to span several"
            )
        if self.base_model is not None and self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} is not a key of 'models'")
        stray = [
            m for m in (self.calibration.files if self.calibration else {}) if m not in self.models
        ]
        if stray:
            raise ValueError(f"calibration.files: {stray[0]!r} is not a key of 'models'")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objective names must be unique")
        if self.reference is not None and len(self.reference) != len(self.objectives):
            raise ValueError(
                f"reference has {len(self.reference)} values; give one per objective "
                f"({len(self.objectives)})"
            )
        return self

    def offline_env(self) -> dict[str, str]:
        """The offline switches to set in every process that loads models, tokenizers or
        datasets (both libraries read them at import); empty: leave the environment alone."""
        if self.offline is None:
            return {}
        value = "1" if self.offline else "0"
        return {"HF_HUB_OFFLINE": value, "HF_DATASETS_OFFLINE": value}

    @classmethod
    def load(cls, path: Union[str, Path]) -> RunConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvomergeError(f"{path}: run config not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EvomergeError(f"{path}: cannot read run config ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise EvomergeError(f"{path}: not valid YAML{at}") from None
        return cls.from_dict(data, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "run config", base_dir: Optional[Path] = None
    ) -> RunConfig:
        if not isinstance(data, dict):
            raise EvomergeError(f"{source}: expected a mapping of run settings")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            message = describe_validation_error(exc)
            unknown = [e for e in exc.errors() if e["type"] == "extra_forbidden"]
            if unknown and len(unknown[0]["loc"]) == 1:
                close = difflib.get_close_matches(str(unknown[0]["loc"][0]), cls.model_fields, 1)
                hint = f"did you mean '{close[0]}'?" if close else "remove it"
                message = f"field '{unknown[0]['loc'][0]}': unknown field; {hint}"
            raise EvomergeError(f"{source}: {message}") from None
        config.baselines = list(normalize_baselines(config.baselines))
        if base_dir is not None:  # relative paths: from the current folder, else the config's
            if isinstance(config.search_space, str):
                config.search_space = _beside(config.search_space, base_dir)
            elif isinstance(config.search_space.get("coefficients"), str):  # a learned space's
                named = _beside(config.search_space["coefficients"], base_dir)
                config.search_space["coefficients"] = str(Path(named).resolve())
            if config.references_from:
                config.references_from = _beside(config.references_from, base_dir)
            if config.calibration is not None:
                calibration = config.calibration
                if calibration.file is not None:
                    calibration.file = _beside(calibration.file, base_dir)
                calibration.files = {k: _beside(v, base_dir) for k, v in calibration.files.items()}
            for spec in config.baselines:
                if isinstance(spec, BaselineSpec) and isinstance(spec.recipe, str):
                    spec.recipe = _beside(spec.recipe, base_dir)
            if isinstance(config.fitness, LmEvalFitnessSpec) and config.fitness.include_path:
                config.fitness.include_path = _beside(config.fitness.include_path, base_dir)
            if isinstance(config.fitness, PythonFitness) and config.fitness.path is None:
                top = config.fitness.function.partition(":")[0].split(".")[0]
                beside = [base_dir / top, base_dir / f"{top}.py"]
                here = [Path(top), Path(f"{top}.py")]
                if any(p.exists() for p in beside) and not any(p.exists() for p in here):
                    config.fitness.path = str(base_dir.resolve())
        return config


def _beside(path: str, base_dir: Path) -> str:
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or not (base_dir / candidate).exists():
        return path
    return str(base_dir / candidate)
