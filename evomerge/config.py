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
    name: str = Field(
        min_length=1,
        description="The objective's name, as status, the report and the store call it.",
    )
    metric: Optional[str] = Field(
        default=None,
        min_length=1,
        description=(
            'One fitness metric, e.g. "arith: acc,none" (lm-eval\'s "task: metric,filter").'
        ),
    )
    weights: Optional[dict[str, float]] = Field(
        None, description="Or a weighted sum of metrics: metric -> weight."
    )
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="maximize or minimize."
    )

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
    name: str = Field(
        description="cma, sep_cma, m2n2, nsga2, pymoo_nsga2, tpe, random, map or nested_map."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The optimizer's own settings (population_size, sigma, ...).",
    )


class PythonFitness(BaseModel):
    """`module:function(model, tokenizer) -> {metric: value}`, run in the worker."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["python"] = Field(
        "python", description="python: a function scores the live model."
    )
    function: str = Field(
        pattern=r"^[\w.]+:\w+$",
        description="module:function(model, tokenizer) -> {metric: value}, run in the worker.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Passed as keyword arguments."
    )
    path: Optional[str] = Field(
        None,
        description=(
            "The folder the module is imported from besides the current one: the run config's, "
            "when the module sits next to it (set on load); on a cluster it is shipped to every "
            "node."
        ),
    )


class HeldOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval tasks scored for the Pareto set, the sources and the baselines only.",
    )
    limit: Optional[int] = Field(
        default=None, gt=0, description="The first N documents of each held-out task."
    )


class Fidelity(BaseModel):
    """Multi-fidelity racing (racing.py): document counts per task for each stage, the last
    one `full` or the largest; the best `promote` fraction of the latest `window` candidates
    at a stage go on to the next."""

    model_config = ConfigDict(extra="forbid")
    stages: list[Union[Annotated[int, Field(gt=0)], Literal["full"]]] = Field(
        min_length=2,
        description="Documents per task at each racing stage, increasing; the last may be full.",
    )
    promote: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="The fraction of the latest window of candidates at a stage that goes on.",
    )
    window: int = Field(
        default=8, ge=2, description="How many recent candidates at a stage the promotion compares."
    )
    estimator: Literal["mean", "irt"] = Field(
        "mean",
        description=(
            "What a race that ends early is told: its stage mean shifted by the mean stage-to-"
            'final change ("mean"), or an item-response estimate of its score on all documents '
            '("irt").'
        ),
    )

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
    kind: Literal["lm_eval"] = Field(description="lm_eval: lm-eval tasks score the live model.")
    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names: registered ones, or YAML+JSONL tasks in include_path.",
    )
    include_path: Optional[str] = Field(
        None, description="A folder of task YAMLs (and their data) besides lm-eval's own."
    )
    limit: Optional[int] = Field(default=None, gt=0, description="First N documents of each task.")
    samples: Optional[dict[str, list[int]]] = Field(
        None, description="Or fixed document ids per task."
    )
    batch_size: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = Field(
        8,
        description=(
            "lm-eval's batch size, or auto: the largest power of two up to 64 whose scoring "
            "memory fits beside the rest of a worker (workers on the driver's machine; on a "
            "cluster lm-eval probes its own)."
        ),
    )
    num_fewshot: Union[
        Annotated[int, Field(ge=0)], dict[str, Annotated[int, Field(ge=0)]], None
    ] = Field(None, description="Few-shot examples: one count for every task, or {task: count}.")
    apply_chat_template: bool = Field(
        False,
        description=(
            "Instruct models: prompts go through the tokenizer's chat template, with this system "
            "message (None: the template's own default), few-shot examples as turns of the chat."
        ),
    )
    system_instruction: Optional[str] = Field(
        None, description="The system message of the chat template (apply_chat_template)."
    )
    fewshot_as_multiturn: bool = Field(
        False, description="Few-shot examples as turns of the chat (needs apply_chat_template)."
    )
    gen_kwargs: Optional[dict[str, Any]] = Field(
        None,
        description=(
            "Generation settings for generate_until tasks (max_gen_toks, until, temperature, ...)."
        ),
    )
    held_out: Optional[HeldOut] = Field(
        None,
        description=(
            "Scored only for the final Pareto set, so reported numbers are not the ones searched "
            "on."
        ),
    )
    fidelity: Optional[Fidelity] = Field(
        None,
        description=(
            "Score candidates on growing document subsets and promote only the promising ones."
        ),
    )

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
    file: Optional[NonEmpty] = Field(
        None,
        description=(
            'JSONL with a "text" (or "prompt" and "target") field, or plain text lines: every '
            "source's."
        ),
    )
    files: dict[str, NonEmpty] = Field(
        default_factory=dict,
        description=(
            "Model name -> its own text (the same formats); a source not named reads `file`."
        ),
    )
    limit: Optional[int] = Field(default=64, gt=0, description="The first N texts.")
    max_length: int = Field(default=256, gt=1, description="Tokens per text.")

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
    steps: Optional[int] = Field(default=None, gt=0, description="Default: one pass over the data.")
    lr: float = Field(default=1e-3, gt=0, description="Adam's learning rate.")
    batch_size: int = Field(default=8, gt=0, description="Texts per step (DAM: per source).")
    granularity: Literal["layer", "tensor"] = Field(
        "layer", description='AdaMerging: one lambda per source per "layer" or "tensor".'
    )
    embeddings_and_norms: bool = Field(
        False, description="DAM: coefficients for those tensors too."
    )
    seed: int = Field(0, description="The order texts are drawn in.")


class TrackingSpec(BaseModel):
    """Where evaluations are mirrored for experiment tracking (the run store stays the truth)."""

    model_config = ConfigDict(extra="forbid")
    mlflow: NonEmpty = Field(
        description=(
            "An MLflow tracking URI: sqlite:///mlflow.db, http(s)://server, or a folder (file "
            "store)."
        )
    )
    experiment: NonEmpty = Field(
        "evomerge", description="The MLflow experiment the run is logged under."
    )


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(
        None, description="The run's name: its folder under results/ unless --out names one."
    )
    models: dict[str, NonEmpty] = Field(
        min_length=1,
        description=(
            "Model name -> local folder, hub name, or a recipe file (a merge config or a "
            "multi-stage file): its merge, made once and kept beside the file."
        ),
    )
    base_model: Optional[str] = Field(
        None,
        description=(
            "The model the experts were fine-tuned from (a key of models), where a method needs "
            "one."
        ),
    )
    search_space: Union[str, dict[str, Any]] = Field(
        description=(
            "A search-space file, or one written inline (kind: parameter, dataflow, ps_dfs)."
        )
    )
    objectives: list[Objective] = Field(
        min_length=1, description="What the search optimizes: one or more objectives."
    )
    optimizer: OptimizerSpec = Field(description="The optimizer and its options.")
    budget: int = Field(
        gt=0,
        description="Evaluations the search may spend (sources and baselines are not counted).",
    )
    seed: int = Field(0, description="The seed of the optimizer and of every stochastic merge.")
    fitness: Annotated[
        Union[
            Annotated[PythonFitness, Tag("python")], Annotated[LmEvalFitnessSpec, Tag("lm_eval")]
        ],
        Discriminator(_fitness_kind),
    ] = Field(
        description="How a candidate is scored: lm-eval tasks (kind: lm_eval) or a Python function."
    )
    pool: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray actors; local: score in this process, one candidate at a time."
    )
    workers: Optional[int] = Field(
        default=None,
        gt=0,
        description=(
            "Ray actors; default: one per GPU of the cluster, else one per threads_per_worker CPUs."
        ),
    )
    threads_per_worker: Optional[int] = Field(
        default=None, gt=0, description="CPU actors; default 2."
    )
    gpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description=(
            "GPUs each worker reserves on a GPU cluster: 0.5 puts two small-model workers on a "
            "GPU; 2 or more (whole) spreads one worker's live model over that many GPUs of a node."
        ),
    )
    placement_timeout: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds to wait for Ray to place every worker (and for it to load its sources) before"
            " the run ends with what was asked and what the cluster has."
        ),
    )
    sources: Literal["auto", "device", "host"] = Field(
        "auto",
        description=(
            "Where a GPU worker keeps the source tensors: device, host (pinned, streamed to the "
            "device tensor by tensor) or auto (the device when everything fits it with headroom)."
        ),
    )
    merge_chunk_mib: int = Field(
        default=256,
        gt=0,
        description=(
            "A tensor larger than this (fp32, per input) is merged in row chunks where its method "
            "merges entry by entry: bounds the merge temporaries; the weights are the same."
        ),
    )
    candidate_timeout: Optional[float] = Field(
        default=None,
        gt=0,
        description=(
            "Seconds a candidate may take on its worker before it is killed and recorded as failed."
        ),
    )
    max_consecutive_failures: int = Field(
        default=10,
        gt=0,
        description=(
            "Stop (exit 2, resumable) after this many evaluations in a row failed: a broken "
            "fitness or task must not spend the budget."
        ),
    )
    ray_address: Optional[str] = Field(
        None,
        description=(
            "The Ray cluster's address (or RAY_ADDRESS); default: a local Ray started by the run."
        ),
    )
    device: str = Field(
        "auto", description="Where workers merge and score: cpu, cuda, cuda:N or auto."
    )
    score_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None,
        description=(
            "The dtype every candidate, source and baseline is scored in (the merge math stays "
            "fp32); default: the recipe's output dtype. bfloat16 halves CPU scoring time on CPUs "
            "with bf16."
        ),
    )
    store: Optional[str] = Field(
        None,
        description=(
            "Where evaluations are committed: default SQLite under the run folder, or a "
            "postgresql:// URL."
        ),
    )
    score_sources: bool = Field(
        True, description="Score each source model first (report, hypervolume reference)."
    )
    seed_with_sources: bool = Field(
        True,
        description=(
            "Start the search from the source models the space can express (their scores reused), "
            "so a run never ends below a model the user already had; false for ablations."
        ),
    )
    references_from: Optional[str] = Field(
        None,
        description=(
            "Another run folder whose scores of the same sources and baselines this run reuses, "
            "when its fitness, objectives and score_dtype are this run's (a set of ablation runs "
            "scores them once)."
        ),
    )
    baselines: list[Union[str, BaselineSpec]] = Field(
        default_factory=list,
        description=(
            "Merges the search is measured against (presets or recipes), scored like the sources."
        ),
    )
    reference: Optional[list[float]] = Field(
        None, description="Hypervolume reference, one value per objective."
    )
    allow_pickle: bool = Field(
        False,
        description=(
            "Load .bin/.pt weights (with torch's weights_only loader); safetensors only by default."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Run model code from the checkpoints' repositories (off by default)."
    )
    allow_benchmark_fitness: bool = Field(
        False,
        description=(
            "Search on a public benchmark's test split without held-out tasks (refused by default)."
        ),
    )
    tracking: Optional[TrackingSpec] = Field(
        None, description="Mirror evaluations to MLflow (the store stays the truth)."
    )
    calibration: Optional[CalibrationSpec] = Field(
        None,
        description=(
            "Text for data-aware merges (fisher, regmean) and each source's own text for DAM."
        ),
    )
    learning: Optional[LearningSpec] = Field(
        None,
        description=(
            "How the run trains its learned merges (dam / adamerging baselines, a search over "
            "them)."
        ),
    )
    offline: Optional[bool] = Field(
        None,
        description=(
            "Hugging Face offline mode for the run's processes: true (local models and tasks "
            "only), false (hub downloads allowed), or unset: as HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE say."
        ),
    )

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
