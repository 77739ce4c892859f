"""Goal-driven search: the recipe's `search:` block explored by Optuna, each trial a plain recipe.

A trial is a recipe variant (the block's fields set by path, optional stages dropped) that runs
through compress.pipeline like any recipe, with the same injected `run_stage` the CLI or the
Prefect flow uses; so a trial has its own report card, and stages that trials share (same
lineage id: the fine-tuned teacher, a prune two trials agree on) are built once and reused,
counted per trial. The constraints are the recipe's gates (compress.report.check_gates), set on
each trial with `Trial.set_constraint` so the multi-objective sampler prefers feasible models.

Why these choices:
- The study is the record. It lives in SQLite next to the reports (or PostgreSQL) so a killed
  search resumes where it stopped (a trial whose process died is marked lost and retried) and
  several workers share one study.
- Deterministic for a seed: each trial is sampled by a fresh sampler seeded from (seed, trial
  number), so the same history gives the same next trial, and a resumed search never replays
  the random stream it started with.
- Cheap before expensive: after each stage the metric is reported; a trial whose metric fails
  a gate after its last training stage cannot recover and stops there (optionally, Optuna's
  median pruner also stops trials below the median at a stage). Optuna's pruners are single-
  objective, so they read a companion study `<study>.pruning` that holds those values.
- Start from what works: trial 0 is the recipe as written (where its values lie in the space).
- Results a user can act on: the feasible Pareto front (report.md, report.html, trials.json),
  the best feasible trial as a plain recipe and its model published to `latest/`, and when no
  trial meets the gates, the closest ones named and kept.

This module never imports Prefect: flows/search.py runs the same trials as flow runs.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import json
import logging
import statistics
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel

from compress import pipeline
from compress.artifact import canonical_hash
from compress.atomic import atomic_write_json, atomic_write_text, owner_alive, owner_record
from compress.errors import CompressError, RecipeError, first_line
from compress.interrupt import Interrupted
from compress.locks import exclusive
from compress.metrics import CLASSIFICATION, METRICS
from compress.pipeline import Plan, execute, make_plan, publish_latest, recipe_lock
from compress.recipe import Recipe, parse_recipe
from compress.report import (
    HeadToHead,
    RunReport,
    StageCard,
    check_gates,
    deltas,
    p50,
    read_report,
)
from compress.search_report import (
    SearchResult,
    TrialRow,
    search_html,
    search_markdown,
    trial_line,
)
from compress.search_spec import COSTS, ENABLED, Range, SearchSpec
from compress.sweep import assign, path_text, resolve

MAX_OPTIONAL = 6  # optional stages in one space: every on/off combination is checked up front
NOT_SEARCHED = ("kind", "name", "search", "output_root")


class TrialPruned(CompressError):
    """The search stopped a trial early: it cannot meet a gate, or it trails earlier trials."""


# ----------------------------------------------------------------------------- the space


def _coded(value: Any) -> Any:
    """Optuna's categorical choices are scalars: lists and mappings travel as JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a recipe field (or a stage's on/off switch)."""

    name: str  # the key as written in the block: Optuna's parameter name
    path: tuple[str | int, ...]  # resolved to indices in the recipe as written
    stage: int | None  # the stage it belongs to (its index in the recipe), if any
    kind: str  # "choice", "enabled", "int" or "float"
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind in ("choice", "enabled"):
            coded = [_coded(c) for c in self.choices]
            picked = trial.suggest_categorical(self.name, coded)
            same = [i for i, c in enumerate(coded) if c == picked]  # 1 == True: type first
            return self.choices[next((i for i in same if type(coded[i]) is type(picked)),
                                     same[0])]
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def _numeric(annotation: Any) -> str | None:
    """"int" or "float" when a range can set this field (`X | None` counts as X)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in (typing.get_args(annotation) if union else (annotation,))
            if a is not type(None)]
    if len(args) != 1 or args[0] is bool:
        return None
    return {int: "int", float: "float"}.get(args[0])


def _type_name(annotation: Any) -> str:
    if typing.get_args(annotation):  # list[int], Literal['a', 'b'], int | None
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation)


def _field(recipe: Recipe, steps: list[str | int], label: str) -> Any:
    """The annotation of the field at `steps`, walking the recipe's pydantic models (a stage
    item is its own config class); an unknown field is one line with a suggestion."""
    node: Any = recipe
    cls: Any = Recipe
    annotation: Any = None
    for i, step in enumerate(steps):
        where = path_text(steps[:i]) or "the recipe"
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                have = f" (it has 0 to {len(node) - 1})" if isinstance(node, list) else ""
                raise RecipeError(f"{label}: no item [{step}] at {where}{have}")
            node = node[step]
            cls = type(node)
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise RecipeError(f"{label}: {where} has no fields (it is {_type_name(cls)})")
        fields = cls.model_fields
        if step not in fields:
            close = difflib.get_close_matches(step, list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RecipeError(f"{label}: {where} has no field {step!r}; {hint}fields: "
                              f"{', '.join(sorted(fields))}")
        annotation = fields[step].annotation
        node = getattr(node, step, None) if isinstance(node, BaseModel) else None
        options = [annotation, *typing.get_args(annotation)]
        cls = type(node) if isinstance(node, BaseModel) else next(
            (a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return annotation


def _value_text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


@dataclass
class Space:
    """The search block checked against its recipe: every key resolved, typed and tried."""

    recipe: Recipe
    spec: SearchSpec
    params: list[Param]

    @classmethod
    def of(cls, recipe: Recipe) -> Space:
        """Check the block against the recipe before any work (RecipeError: exit 2): every
        path exists, ranges are on numeric fields, every choice and both ends of every range
        make a valid recipe, and so does every on/off combination of the optional stages."""
        spec = recipe.search
        if spec is None:
            raise RecipeError(f"{recipe.name}: the recipe has no search: block (objectives, "
                              "space, budget); see README, 'Search'")
        raw = recipe.model_dump(mode="json", exclude={"search"})
        params: list[Param] = []
        seen: dict[str, str] = {}
        for key, values in spec.space.items():
            label = f"search.space.{key}"
            steps = resolve(raw, key, label)
            canon = path_text(steps)
            if canon in seen:
                raise RecipeError(f"{label}: the same field as search.space.{seen[canon]} "
                                  f"({canon}); list it once")
            seen[canon] = key
            if any(s in NOT_SEARCHED for s in steps if isinstance(s, str)) and \
                    steps[-1] != ENABLED:
                raise RecipeError(f"{label}: {canon} cannot be searched (kind, name, "
                                  "output_root and the search block are fixed)")
            stage = steps[1] if len(steps) > 1 and steps[0] == "stages" and \
                isinstance(steps[1], int) else None
            if steps[-1] == ENABLED:
                params.append(_toggle(recipe, steps, values, label))
                continue
            annotation = _field(recipe, steps, label)
            if isinstance(values, Range):
                kind = _numeric(annotation)
                if kind is None:
                    raise RecipeError(f"{label}: a range needs a numeric field; {canon} is "
                                      f"{_type_name(annotation)}: list its choices instead "
                                      "([a, b, ...])")
                ends = [values.low, values.high, values.step or 1.0]
                if kind == "int" and not all(float(x).is_integer() for x in ends):
                    raise RecipeError(f"{label}: {canon} is a whole number; give whole numbers "
                                      "for low, high and step")
                param = Param(key, tuple(steps), stage, kind, (), values.low, values.high,
                              values.log, values.step)
                tries = [int(values.low), int(values.high)] if kind == "int" else \
                    [values.low, values.high]
            else:
                param = Param(key, tuple(steps), stage, "choice", tuple(values))
                tries = list(values)
            for value in tries:
                variant = copy.deepcopy(raw)
                assign(variant, canon, value, label)
                parse_recipe(variant, f"{label}: {_value_text(value)} makes a bad recipe")
            params.append(param)
        _check_toggles(raw, [p for p in params if p.kind == "enabled"], recipe)
        return cls(recipe=recipe, spec=spec, params=params)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """This trial's values, in a fixed order: the on/off switches first, then the fields
        of the stages that run (a dropped stage's fields are not sampled)."""
        values = {p.name: p.suggest(trial) for p in self.params if p.kind == "enabled"}
        off = {p.stage for p in self.params if p.kind == "enabled" and not values[p.name]}
        for p in self.params:
            if p.kind != "enabled" and (p.stage is None or p.stage not in off):
                values[p.name] = p.suggest(trial)
        return values

    def as_written(self) -> dict[str, Any]:
        """The recipe's own values of the searched fields, those that lie in the space (as
        Optuna parameters): the baseline trial."""
        raw = self.recipe.model_dump(mode="json", exclude={"search"})
        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "enabled":
                if True in p.choices:
                    out[p.name] = True
                continue
            node: Any = raw
            for step in p.path:
                node = node.get(step) if isinstance(node, dict) else \
                    node[step] if isinstance(node, list) and isinstance(step, int) else None
            if p.kind == "choice":
                coded = [_coded(c) for c in p.choices]
                if _coded(node) in coded:  # as the choice is written (2, not 2.0)
                    out[p.name] = coded[coded.index(_coded(node))]
            elif isinstance(node, int | float) and not isinstance(node, bool) and \
                    p.low <= node <= p.high and (p.kind == "float" or float(node).is_integer()):
                step = p.step or (1 if p.kind == "int" else None)
                if step is None or abs((node - p.low) / step - round((node - p.low) / step)) \
                        < 1e-9:
                    out[p.name] = int(node) if p.kind == "int" else float(node)
        return out

    def variant(self, values: dict[str, Any], name: str) -> tuple[Recipe, list[int]]:
        """The plain recipe for these values (no search block), named `name`; and, for each of
        its stages, that stage's index in the recipe as written."""
        raw = self.recipe.model_dump(mode="json", exclude={"search"})
        off = set()
        for p in self.params:
            if p.name not in values:
                continue
            if p.kind == "enabled":
                if not values[p.name]:
                    off.add(p.stage)
            else:
                assign(raw, path_text(list(p.path)), values[p.name], f"search.space.{p.name}")
        kept = [i for i in range(len(raw["stages"])) if i not in off]
        raw["stages"] = [raw["stages"][i] for i in kept]
        raw["name"] = name
        return parse_recipe(raw, f"trial {name}"), kept


def _toggle(recipe: Recipe, steps: list[str | int], values: Any, label: str) -> Param:
    if len(steps) != 3 or steps[0] != "stages" or not isinstance(steps[1], int):
        raise RecipeError(f"{label}: `{ENABLED}` switches a whole stage on or off, like "
                          f"stages[NAME].{ENABLED}: [true, false]")
    if steps[1] >= len(recipe.stages):
        raise RecipeError(f"{label}: no item [{steps[1]}] at stages (it has 0 to "
                          f"{len(recipe.stages) - 1})")
    if not isinstance(values, list) or not all(isinstance(v, bool) for v in values):
        raise RecipeError(f"{label}: whether a stage runs is a choice: [true, false]")
    return Param(label.removeprefix("search.space."), tuple(steps), steps[1], "enabled",
                 tuple(dict.fromkeys(values)))


def _check_toggles(raw: dict, toggles: list[Param], recipe: Recipe) -> None:
    if len(toggles) > MAX_OPTIONAL:
        raise RecipeError(f"search.space: {len(toggles)} optional stages; at most "
                          f"{MAX_OPTIONAL} (each on/off combination is a different recipe)")
    for combo in itertools.product(*(p.choices for p in toggles)):
        off = [p for p, on in zip(toggles, combo, strict=True) if not on]
        if not off:
            continue
        dropped = {p.stage for p in off}
        names = ", ".join(f"stages[{p.stage}] ({recipe.stages[p.stage].label})" for p in off)
        variant = copy.deepcopy(raw)
        variant["stages"] = [s for i, s in enumerate(variant["stages"]) if i not in dropped]
        if not variant["stages"]:
            raise RecipeError(f"search.space: without {names} the recipe has no stage left")
        parse_recipe(variant, f"search.space: without {names} the recipe is bad")


# ----------------------------------------------------------------------------- sampling


class _PerTrialSeed(BaseSampler):
    """A sampler made afresh for each trial, seeded from (seed, trial number).

    Optuna's samplers draw from one random stream per process: a resumed search would replay
    the trials it started with, and two workers would draw the same ones. Seeding per trial
    number makes trial N's proposal a function of the seed and the history before it.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(self._seed * 100_003 + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(spec: SearchSpec) -> BaseSampler:
    """The block's sampler; every one of them reads the gates from `Trial.set_constraint`."""
    samplers = optuna.samplers
    makers: dict[str, Callable[[int], BaseSampler]] = {
        "tpe": lambda s: samplers.TPESampler(seed=s, n_startup_trials=spec.startup_trials,
                                             multivariate=True, group=True),
        "nsga2": lambda s: samplers.NSGAIISampler(seed=s),
        "gp": lambda s: samplers.GPSampler(seed=s, n_startup_trials=spec.startup_trials),
        "random": lambda s: samplers.RandomSampler(seed=s),
    }
    def make(seed: int) -> BaseSampler:
        with warnings.catch_warnings():  # multivariate/group TPE is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return makers[spec.sampler](seed)

    return _PerTrialSeed(make, spec.seed)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna logs every trial and warns that multivariate/group TPE is experimental; the
    search prints its own line per trial."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def storage_label(url: str) -> str:
    """The storage URL with its password hidden (for reports and errors)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show it, it has no password to hide
        return url


def check_storage_url(url: str) -> None:
    """What can be said of a storage URL without connecting (`compress validate` says it)."""
    label = storage_label(url)
    if url.startswith("postgresql+asyncpg"):
        raise RecipeError(f"search.storage: {label}: Optuna needs a synchronous driver; use "
                          "postgresql:// (psycopg) or postgresql+psycopg2://")
    if not url.startswith(("sqlite:///", "postgresql", "mysql")):
        raise RecipeError(f"search.storage: {label}: not a database URL (sqlite:///PATH or "
                          "postgresql://USER@HOST/DB)")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage; a bad URL or a missing driver is one line before any work."""
    check_storage_url(url)
    label = storage_label(url)
    kwargs: dict[str, Any] = {}
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 120}}  # workers take turns on the file lock
        # Creating the schema of a new file is not safe from two processes at once.
        lock = exclusive(db.with_name(db.name + ".lock"), wait=True)
    try:
        with lock, _optuna_quiet():
            return _rdb_storage(url, kwargs)
    except ImportError as e:  # Optuna wraps the driver's ModuleNotFoundError
        missing = getattr(e.__cause__ or e.__context__ or e, "name", None) or first_line(e)
        raise RecipeError(f"search.storage: {label}: its database driver is not installed "
                          f"({missing}); for PostgreSQL: pip install 'psycopg[binary]' "
                          "(postgresql://) or psycopg2-binary (postgresql+psycopg2://)") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: one line, nothing ran
        raise RecipeError(f"search.storage: cannot open {label}: {first_line(e)}") from None


def _rdb_storage(url: str, kwargs: dict[str, Any], tries: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage, again when two processes created a server database's schema at once: the
    loser's CREATE fails on the winner's tables (PostgreSQL: a unique violation on pg_type, seen
    with two search workers starting together), and a second try finds them made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(tries - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (IntegrityError, ProgrammingError):
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)  # the last try raises


# ----------------------------------------------------------------------------- one trial


def trial_name(recipe: str, number: int) -> str:
    return f"{recipe[:57].rstrip('-')}-t{number:03d}"


def _violation(passed: bool, value: float, threshold: float) -> float:
    """A gate as an Optuna constraint: <= 0 when met, else the shortfall relative to the
    threshold (so gates in points, ratios and ms weigh alike when ranking the closest)."""
    gap = abs(value - threshold) / (abs(threshold) or 1.0)
    return -gap if passed else max(gap, 1e-9)


def cards_of(plan: Plan, report: RunReport) -> list[StageCard]:
    """The stage outputs a run used, the reference's own stage and its ONNX export included:
    what 'built' and 'reused' count."""
    ref = [report.reference] if report.reference and plan.reference_index is not None else []
    return [*ref, *([report.reference_onnx] if report.reference_onnx else []), *report.stages]


@dataclass
class _Watch:
    """The trial's `on_card`: records the metric after each stage and stops the trial when it
    cannot meet a gate (or trails earlier trials, with the median pruner)."""

    search: Search
    trial: optuna.Trial
    plan: Plan | None = None
    kept: list[int] = field(default_factory=list)
    report: RunReport | None = None
    intermediate: dict[str, float] = field(default_factory=dict)
    pruning: optuna.Trial | None = None
    pruned_gates: list[Any] = field(default_factory=list)

    def __call__(self, report: RunReport, card: StageCard | None) -> None:
        self.report = report
        if card is None or self.plan is None or card.kind == "reference" or \
                card.index is None or card.index < 0:
            return
        at = self.kept[card.index]
        label = f"stages[{at}] ({card.name})"
        self.intermediate[label] = card.metrics.value
        self.trial.set_user_attr("intermediate", self.intermediate)
        spec = self.search.spec
        if spec.pruner == "none":
            return
        if card.index >= last_training(self.plan):
            failed = [g for g in check_gates(report, self.plan.recipe.gates.quality())
                      if not g.passed]
            if failed:
                self.pruned_gates = failed
                raise TrialPruned(f"after {label}: {failed[0].gate}: {failed[0].message}; no "
                                  "later stage wins the metric back")
        if self.pruning is not None:
            score = METRICS[card.metrics.metric].score(card.metrics.value)
            self.pruning.report(score, at)
            if self.pruning.should_prune():
                raise TrialPruned(f"after {label}: {card.metrics.metric} "
                                  f"{card.metrics.value:.2f} is below the median of earlier "
                                  "trials there (median pruner)")


def last_training(plan: Plan) -> int:
    """The last stage that trains, not counting the one that makes the reference; -1 if none:
    from there on the metric can only fall."""
    return max((ps.index for ps in plan.stages
                if ps.config.trains and ps.index != plan.reference_index), default=-1)


# ----------------------------------------------------------------------------- the search


def search_id(recipe: Recipe) -> str:
    """What the study is about (the recipe and what the block searches; not the budget or the
    storage, so a bigger budget resumes the same study)."""
    assert recipe.search is not None
    return canonical_hash(recipe.model_dump(mode="json", exclude={"search", "output_root"}),
                          recipe.search.model_dump(mode="json",
                                                   exclude={"budget", "storage", "study"}))[:8]


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Search:
    """One search of one recipe: its study, its folder, its trials.

    Several processes may hold a Search of the same recipe at once (the flow's workers): they
    share the study through its storage and take turns to start trials (a lock in the search
    folder), so the budget holds whichever worker starts the last trial.
    """

    def __init__(self, recipe: Recipe, reports_dir: Path | str,
                 started: float | None = None) -> None:
        self.space = Space.of(recipe)
        self.recipe, self.spec = recipe, self.space.spec
        self.reports_dir = Path(reports_dir).resolve()
        self.id = search_id(recipe)
        self.study_name = self.spec.study or f"{recipe.name}-{self.id}"
        self.folder = self.reports_dir / recipe.name / f"search-{self.spec.study or self.id}"
        self.trials_dir = self.folder / "trials"
        self.storage_url = self.spec.storage_url(
            str(self.reports_dir / recipe.name / "search.db"))
        check_storage_url(self.storage_url)
        self.started = time.time() if started is None else started
        self.metric = recipe.metric
        self.directions = [self.direction(o) for o in self.spec.objectives]
        self.stop_reason = ""
        self._study: optuna.Study | None = None
        self._pruning: optuna.Study | None = None
        self._plan: Plan | None = None
        self._check_objectives()

    # ------------------------------------------------------------------ setup

    def direction(self, objective: str) -> str:
        if objective in COSTS:
            return "minimize"
        name = self.metric if objective == "metric" else objective
        return "maximize" if METRICS[name].higher_is_better else "minimize"

    def _check_objectives(self) -> None:
        """A named metric must be one the task's cards carry (classifiers: accuracy and F1;
        causal LMs: the others)."""
        lm = self.recipe.model.task == "causal-lm"
        for o in self.spec.objectives:
            if o in COSTS or o == "metric":
                continue
            if lm == (o in CLASSIFICATION):
                raise RecipeError(f"search.objectives: {o} is not measured for "
                                  f"{self.recipe.model.task} (its metric: {self.metric})")

    def check(self) -> Plan:
        """The recipe as written, planned: the model, data and every stage checked against
        the world before the first trial (RecipeError: exit 2)."""
        self._plan = make_plan(self.recipe.model_copy(update={"search": None}))
        return self._plan

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self.open()
        assert self._study is not None
        return self._study

    def open(self) -> optuna.Study:
        """Create or load the study (and its pruning companion), and take back trials whose
        process died: marked lost, their values queued to run again."""
        if self._plan is None:
            self.check()
        storage = open_storage(self.storage_url)
        self.folder.mkdir(parents=True, exist_ok=True)
        with _optuna_quiet():
            self._study = optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=make_sampler(self.spec),
                directions=self.directions, load_if_exists=True)
            if self.spec.pruner == "median":
                pruner = optuna.pruners.MedianPruner(
                    n_startup_trials=self.spec.startup_trials,
                    n_warmup_steps=max(last_training(self._plan), 0))
                self._pruning = optuna.create_study(
                    study_name=f"{self.study_name}.pruning", storage=storage,
                    direction="maximize", pruner=pruner, load_if_exists=True)
        if [d.name.lower() for d in self._study.directions] != self.directions:
            raise RecipeError(f"search.study: {self.study_name!r} in {self.storage_label} has "
                              "other objectives; name another study")
        with self._turn():
            self._recover()
            if self.spec.baseline and not self._study.get_trials(deepcopy=False):
                written = self.space.as_written()
                if written:
                    with _optuna_quiet():
                        self._study.enqueue_trial(written, user_attrs={"baseline": True})
        return self._study

    @property
    def storage_label(self) -> str:
        return storage_label(self.storage_url)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """One worker at a time checks the budget and starts a trial."""
        with exclusive(self.folder / ".turn.lock", wait=True):
            yield

    def _recover(self) -> None:
        assert self._study is not None
        # Called under the turn lock, which a trial's starter holds until its owner is
        # recorded: a running trial without an owner lost its process in between.
        for t in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("owner")
            if owner is not None and owner_alive(owner):
                continue
            self._lose(t._trial_id, t.params, t.number, t.user_attrs.get("pruning_trial"),
                       "its process ended before the trial finished (killed or crashed)")

    def _lose(self, trial_id: int, params: dict[str, Any], number: int,
              pruning_trial: int | None, why: str) -> None:
        """A trial that did not finish (killed, interrupted): not counted, and run again."""
        study = self.study
        study._storage.set_trial_user_attr(trial_id, "lost", f"{why}; retried")
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if pruning_trial is not None and self._pruning is not None:
            with contextlib.suppress(Exception):  # already finished
                self._pruning._storage.set_trial_state_values(pruning_trial, TrialState.FAIL)
        with _optuna_quiet():
            study.enqueue_trial(params, user_attrs={"retry_of": number}, skip_if_exists=False)

    # ------------------------------------------------------------------ budget

    def more(self) -> bool:
        """Whether to start another trial: trials left in the budget (a queued retry counts
        as already budgeted), and time for one more like the ones so far."""
        trials = self.study.get_trials(deepcopy=False)
        retry = any(t.state == TrialState.WAITING for t in trials)
        if self.spec.budget.trials is not None and not retry:
            used = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING)
                       or (t.state == TrialState.FAIL and "lost" not in t.user_attrs))
            if used >= self.spec.budget.trials:
                self.stop_reason = f"trials: {self.spec.budget.trials} in the study"
                return False
        minutes = self.spec.budget.minutes
        if minutes is not None:
            left = self.started + minutes * 60 - time.time()
            took = [t.user_attrs.get("own_seconds", t.duration.total_seconds())
                    for t in trials if t.state == TrialState.COMPLETE and t.duration is not None]
            need = statistics.median(took) if took else 0.0
            if left <= 0 or need > left:
                self.stop_reason = (f"time: {minutes:g} min budget" if left <= 0 else
                                    f"time: a trial takes about {_span(need)} and "
                                    f"{_span(left)} of the budget are left")
                return False
        return True

    # ------------------------------------------------------------------ a trial

    def run_trial(self, *, run_stage: Callable[..., StageCard] = pipeline.run_stage,
                  evaluate_reference: Callable[[Plan], StageCard] = pipeline.evaluate_reference,
                  time_final: Callable[[Plan, RunReport], HeadToHead | None] = pipeline.time_final,
                  on_card: Callable[[RunReport, StageCard | None], None] | None = None,
                  on_start: Callable[[int, str], None] | None = None,
                  say: Callable[[str], None] | None = None) -> TrialRow | None:
        """Start one trial if the budget allows, run it, tell the study; None when the budget
        is spent. The caller injects what differs (Prefect tasks for `run_stage`, artifacts in
        `on_card`), exactly as for a plain run; `on_start(number, name)` names it early."""
        with self._turn():
            if not self.more():
                return None
            with _optuna_quiet():
                trial = self.study.ask()
            trial.set_user_attr("owner", owner_record())
        name = trial_name(self.recipe.name, trial.number)
        trial.set_user_attr("name", name)
        if on_start is not None:
            on_start(trial.number, name)
        watch = _Watch(self, trial)
        if self._pruning is not None:
            watch.pruning = self._pruning.ask()
            trial.set_user_attr("pruning_trial", watch.pruning._trial_id)
        t0 = time.monotonic()
        try:
            values = self.space.suggest(trial)
            variant, watch.kept = self.space.variant(values, name)
            trial.set_user_attr("recipe", variant.model_dump(mode="json", exclude_none=True))
            watch.plan = make_plan(variant)

            def both(report: RunReport, card: StageCard | None) -> None:
                if on_card is not None:
                    on_card(report, card)
                watch(report, card)

            report = execute(watch.plan, self.trials_dir, run_stage=run_stage,
                             evaluate_reference=evaluate_reference, time_final=time_final,
                             on_card=both,
                             keep_going=True, publish=False)
            self._finish(trial, watch, report, time.monotonic() - t0)
        except TrialPruned as e:
            self._record(trial, watch, time.monotonic() - t0, note=str(e))
            for g in watch.pruned_gates:
                trial.set_constraint(g.gate, _violation(g.passed, g.value, g.threshold))
            self._tell(trial, watch, TrialState.PRUNED)
        except (Interrupted, KeyboardInterrupt):
            self._lose(trial._trial_id, trial.params, trial.number,
                       watch.pruning._trial_id if watch.pruning else None,
                       "interrupted")
            raise
        except Exception as e:  # noqa: BLE001 - a trial's failure is a row, not the search's end
            msg = str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}"
            self._record(trial, watch, time.monotonic() - t0, note=first_line(
                ValueError(msg), 400))
            self._tell(trial, watch, TrialState.FAIL)
        row = self.row(self.study._storage.get_trial(trial._trial_id))
        if say is not None:
            say(trial_line(row, self.spec.objectives, self.metric))
        return row

    def _record(self, trial: optuna.Trial, watch: _Watch, seconds: float,
                note: str = "") -> None:
        report = watch.report
        attrs: dict[str, Any] = {"seconds": round(seconds, 1), "note": note}
        if report is not None and watch.plan is not None:
            cards = cards_of(watch.plan, report)
            ref = report.reference
            teacher = ref.seconds if ref is not None and watch.plan.reference_index is not None \
                and not ref.reused else 0.0
            attrs |= {"report": str(pipeline.report_folder(self.trials_dir, report)),
                      "built": sum(not c.reused for c in cards),
                      "reused": sum(c.reused for c in cards),
                      # what a trial costs once the shared reference (the teacher) exists
                      "own_seconds": round(max(seconds - teacher, 0.0), 3)}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)

    def _tell(self, trial: optuna.Trial, watch: _Watch, state: TrialState,
              values: list[float] | None = None) -> None:
        with _optuna_quiet():
            self.study.tell(trial, values, state=state)
            if watch.pruning is None or self._pruning is None:
                return
            final = watch.report.final if watch.report is not None else None
            if state == TrialState.COMPLETE and final is not None:
                score = METRICS[final.metrics.metric].score(final.metrics.value)
                self._pruning.tell(watch.pruning, score)
            else:
                self._pruning.tell(watch.pruning, state=state)

    def _finish(self, trial: optuna.Trial, watch: _Watch, report: RunReport,
                seconds: float) -> None:
        final = report.final
        assert final is not None and watch.plan is not None
        self._record(trial, watch, seconds)
        values: dict[str, float] = {}
        for o in self.spec.objectives:
            v = self.objective(o, report)
            if v is None:
                raise CompressError(f"objective {o}: the final card has no {o} "
                                    f"({final.name}, {final.metrics.runtime})")
            values[o] = v
        trial.set_user_attr("values", values)
        trial.set_user_attr("deltas", deltas(report, final))
        trial.set_user_attr("model", final.model.path)
        trial.set_user_attr("gates", [{"gate": g.gate, "passed": g.passed,
                                       "message": g.message} for g in report.gates])
        for g in report.gates:
            trial.set_constraint(g.gate, _violation(g.passed, g.value, g.threshold))
        self._tell(trial, watch, TrialState.COMPLETE, [values[o] for o in self.spec.objectives])

    def objective(self, name: str, report: RunReport) -> float | None:
        final = report.final
        assert final is not None
        m = final.metrics
        if name == "latency":
            return p50(final, 1)
        if name == "size":
            return float(m.size_bytes)
        if name == "macs":
            return None if m.macs is None else float(m.macs)
        return m.value if name in ("metric", m.metric) else m.all_scores().get(name)

    # ------------------------------------------------------------------ results

    def row(self, t: FrozenTrial) -> TrialRow:
        a = t.user_attrs
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(
            t.state, "lost" if "lost" in a else "failed")
        violation = sum(v for v in t.constraints.values() if v > 0)
        return TrialRow(number=t.number, name=a.get("name", ""), state=state,
                        params=dict(t.params), values=a.get("values", {}),
                        deltas=a.get("deltas", {}), gates=a.get("gates", []),
                        violation=round(violation, 6), note=a.get("lost") or a.get("note", ""),
                        report=a.get("report", ""), model=a.get("model", ""),
                        built=a.get("built", 0), reused=a.get("reused", 0),
                        seconds=a.get("seconds"), intermediate=a.get("intermediate", {}),
                        baseline=bool(a.get("baseline")))

    def results(self) -> SearchResult:
        trials = sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)
        rows = [self.row(t) for t in trials]
        front = sorted(t.number for t in self.study.best_trials) \
            if any(r.state == "complete" for r in rows) else []
        front = [n for n in front if next(r for r in rows if r.number == n).feasible]
        sign = [-1.0 if d == "maximize" else 1.0 for d in self.directions]

        def rank(n: int) -> tuple:
            r = next(x for x in rows if x.number == n)
            return (*[s * r.values[o] for s, o in zip(sign, self.spec.objectives, strict=True)],
                    n)

        best = min(front, key=rank) if front else None
        closest: list[int] = []
        if best is None:
            pool = [r for r in rows if r.state == "complete"] or \
                [r for r in rows if r.state == "pruned" and r.violation > 0]
            closest = [r.number for r in sorted(pool, key=lambda r: (r.violation, r.number))[:3]]
        status = "found" if best is not None else \
            "infeasible" if any(r.state in ("complete", "pruned") for r in rows) else "no-trials"
        return SearchResult(
            recipe=self.recipe.name, study=self.study_name, storage=self.storage_label,
            folder=str(self.folder), status=status, metric=self.metric,
            objectives=list(self.spec.objectives), directions=self.directions,
            gates={k: v for k, v in self.recipe.gates.model_dump().items() if v is not None},
            sampler=self.spec.sampler, pruner=self.spec.pruner, seed=self.spec.seed,
            budget=self.spec.budget.model_dump(), trials=rows, front=front, best=best,
            closest=closest, elapsed_s=round(time.time() - self.started, 1),
            started_at=datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            finished_at=_now())

    def _recipe_of(self, number: int) -> dict[str, Any]:
        t = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        return {**t.user_attrs["recipe"], "name": self.recipe.name}

    def finish(self) -> SearchResult:
        """Write what the study holds: trials.json, report.md, report.html; the best feasible
        trial as best.yaml with its model published to latest/, or the closest trials' recipes
        when none is feasible."""
        res = self.results()
        if res.best is not None:
            raw = self._recipe_of(res.best)
            res.best_recipe = str(self.folder / "best.yaml")
            atomic_write_text(Path(res.best_recipe), _yaml(raw, self._header(res.best)))
            res.published, res.publish_error = self._publish(res.trial(res.best), raw)
            res.versus_written = self._versus_written(res, raw)
        for k, n in enumerate(res.closest, 1):
            atomic_write_text(self.folder / f"closest-{k}.yaml",
                              _yaml(self._recipe_of(n), self._header(n, closest=True)))
        atomic_write_json(self.folder / "trials.json", res.model_dump(mode="json"))
        atomic_write_text(self.folder / "report.md", search_markdown(res))
        atomic_write_text(self.folder / "report.html", search_html(res))
        return res

    def _versus_written(self, res: SearchResult, raw: dict[str, Any]) -> HeadToHead | None:
        """The best trial's final model against the recipe as written, timed in turns in one
        window: the trials' card latencies come from different moments, so the claim that the
        search beat the hand-written recipe rests on this. None when there is no such pair (the
        recipe as written is the best, did not complete, or its model is not on disk)."""
        from compress.evaluate import head_to_head

        assert res.best is not None
        best = res.trial(res.best)
        written = next((t for t in res.trials if t.baseline and t.state == "complete"), None)
        if written is None or written.number == best.number:
            return None
        try:
            a, b = (read_report(Path(t.report)).final for t in (written, best))
            if a is None or b is None or a.metrics.runtime != b.metrics.runtime or \
                    not all(Path(c.model.dir).is_dir() for c in (a, b)):
                return None
            plan = make_plan(parse_recipe(raw, "the best trial's recipe"))
            return head_to_head(a.model, b.model, pipeline.plan_data(plan),
                                plan.recipe.evaluation,
                                names=(f"t{written.number:03d} (as written)",
                                       f"t{best.number:03d}"),
                                trust_remote_code=plan.recipe.model.trust_remote_code)
        except (CompressError, OSError, ValueError) as e:
            logging.getLogger(__name__).warning("best vs the recipe as written not timed: %s",
                                                first_line(e))
            return None

    def _header(self, number: int, closest: bool = False) -> str:
        what = "came closest to the gates (it misses one)" if closest else \
            "is the best trial that meets every gate"
        return (f"# Trial t{number:03d} of study {self.study_name} {what}.\n"
                f"# A plain recipe (no search: block): compress run this file.\n")

    def _publish(self, row: TrialRow, raw: dict[str, Any]) -> tuple[str | None, str | None]:
        """The best trial's model to reports/<recipe>/latest/ (manifest-verified), under the
        recipe's lock so a plain run of the recipe never publishes at the same moment."""
        try:
            report = read_report(Path(row.report))
            recipe = parse_recipe(raw, "the best trial's recipe")
            with recipe_lock(self.reports_dir, self.recipe.name):
                dest = publish_latest(report.model_copy(update={"recipe": self.recipe.name}),
                                      self.reports_dir, recipe)
            return (str(dest) if dest else None), (None if dest else
                                                   f"trial t{row.number:03d} did not pass")
        except (CompressError, OSError, ValueError) as e:
            return None, first_line(e)


def _yaml(raw: dict[str, Any], header: str) -> str:
    return header + yaml.safe_dump(raw, sort_keys=False)


def run_local(search: Search, say: Callable[[str], None] | None = None) -> SearchResult:
    """The search in this process, one trial after another, without Prefect."""
    search.open()
    while search.run_trial(say=say) is not None:
        pass
    if say is not None and search.stop_reason:
        say(f"budget reached ({search.stop_reason})")
    return search.finish()


def with_budget(recipe: Recipe, trials: int | None = None, minutes: float | None = None,
                storage: str | None = None) -> Recipe:
    """The recipe with the command line's budget or storage in place of the block's (checked
    like the block: a zero budget is one line, exit 2)."""
    if recipe.search is None:
        raise RecipeError(f"{recipe.name}: the recipe has no search: block (objectives, space, "
                          "budget); see README, 'Search'")
    if trials is not None and trials < 1:
        raise RecipeError(f"--trials {trials}: a search needs at least 1 trial")
    if minutes is not None and minutes <= 0:
        raise RecipeError(f"--minutes {minutes:g}: a search needs some time (minutes > 0)")
    spec = recipe.search
    budget = spec.budget.model_copy(update={k: v for k, v in
                                            (("trials", trials), ("minutes", minutes))
                                            if v is not None})
    update: dict[str, Any] = {"budget": budget}
    if storage is not None:
        update["storage"] = storage
    return recipe.model_copy(update={"search": spec.model_copy(update=update)})
