"""The search engine on tiny models: constraints respected, trials pruned, shared stages reused
and counted, the best published, the no-feasible path, lost trials retried, determinism.

Most tests inject stages whose cards are computed from their configs (as the flow injects
Prefect tasks for `run_stage`): the numbers are exact, so what the engine decides is checked
exactly and fast. The recipes, plans, reports and the study are real; the tests at the end run
real stages on the tiny BERT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from compress import manifest
from compress.artifact import ModelRef
from compress.cli import app
from compress.recipe import load_recipe
from compress.search import Search, open_storage
from tests.conftest import card

pytestmark = pytest.mark.integration

SOURCE = (100.0, 100.0, 10.0)  # accuracy, size MB, p50 ms of the reference
STAGES = [{"kind": "prune", "ffn": 0.5}, {"kind": "distill", "epochs": 1},
          {"kind": "export"}, {"kind": "quantize"}]


class Fake:
    """Stages whose cards follow from their configs: pruning costs accuracy and saves size and
    time, distillation wins accuracy back, INT8 quarters the size (per-tensor costs more).
    Reuse is by lineage id, as the real runner's."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen, self.built = root, {}, []

    def _card(self, name: str, kind: str, index: int | None, h: str,
              values: tuple[float, float, float], reused: bool):
        c = card(name, round(values[0], 4), values[2], values[1], kind=kind)
        c.index, c.reused = index, reused
        c.model = ModelRef(path=str(self.root / h[:12]), format="hf", task="text-classification",
                           hash=h, stage=kind)
        return c

    def run_stage(self, plan, index, input_ref, progress=None):
        ps = plan.reference_onnx if index == -1 else plan.stages[index]
        acc, size, ms = self.seen.get(input_ref.hash, SOURCE)
        c = ps.config
        if c.kind == "prune":
            acc -= 30 * c.ffn ** 2 + 10 * len(c.drop_layers)
            size, ms = size * (1 - 0.6 * c.ffn), ms * (1 - 0.5 * c.ffn)
        elif c.kind == "distill":
            acc = min(100.0, acc + 4 * c.epochs)
        elif c.kind == "quantize":
            size, ms, acc = size / 4, ms / 2, acc - (0.2 if c.per_channel else 1.5)
        reused = ps.hash in self.seen
        self.seen[ps.hash] = (acc, size, ms)
        if not reused:
            self.built.append(ps.kind)
        return self._card(ps.name, ps.kind, ps.index, ps.hash, (acc, size, ms), reused)

    def evaluate_reference(self, plan):
        return self._card("reference", "reference", None, plan.source.hash, SOURCE, False)

    def time_final(self, plan, report):
        return None  # the fake models are not on disk: no head-to-head timing


def make_search(write_recipe, tmp_path, space, *, gates=None, name="recipe.yaml",
                stages=STAGES, **block) -> Search:
    search = {"space": space, "budget": {"trials": 6}, "objectives": ["latency", "metric"],
              **block}
    path = write_recipe(json.loads(json.dumps(stages)), name=name, search=search,
                        gates=gates or {})
    return Search(load_recipe(path), tmp_path / "reports")


def run(search: Search, fake: Fake):
    search.open()
    rows = []
    while (row := search.run_trial(run_stage=fake.run_stage,
                                   evaluate_reference=fake.evaluate_reference,
                       time_final=fake.time_final)) is not None:
        rows.append(row)
    return rows, search.finish()


SPACE = {"stages[prune].ffn": {"low": 0.1, "high": 0.7},
         "stages[quantize].per_channel": [True, False]}


def test_best_trial_meets_every_gate_and_is_the_fastest_that_does(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, SPACE, budget={"trials": 8},
                    gates={"max_accuracy_drop": 5.0, "min_size_reduction": 5.0})
    rows, res = run(s, Fake(tmp_path))
    assert len(rows) == 8 and {r.state for r in rows} <= {"complete", "pruned"}
    assert all("max_accuracy_drop" in r.note for r in rows if r.state == "pruned")
    feasible = [r for r in rows if r.state == "complete" and all(g["passed"] for g in r.gates)]
    assert feasible and len(feasible) < 8  # the gates matter in this space
    assert {r.number for r in rows if r.feasible} == {r.number for r in feasible}
    assert set(res.front) <= {r.number for r in feasible}
    assert res.best == min(feasible, key=lambda r: r.values["latency"]).number
    assert res.status == "found"
    study = optuna.load_study(study_name=s.study_name, storage=s.storage_url)
    assert all(set(t.constraints) == {"max_accuracy_drop", "min_size_reduction"}
               for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert all(t.constraints["max_accuracy_drop"] > 0 for t in study.trials
               if t.state == optuna.trial.TrialState.PRUNED)  # the sampler learns from them
    md = (Path(res.folder) / "report.md").read_text()
    assert "## Pareto front (trials that meet every gate)" in md
    assert f"| t{res.best:03d} ★" in md
    html = (Path(res.folder) / "report.html").read_text()
    assert 'class="pareto"' in html and 'class="best"' in html and "<script" not in html
    assert json.loads((Path(res.folder) / "trials.json").read_text())["best"] == res.best
    # the fake models are not on disk: nothing is published, and the search says why
    assert res.published is None and "does not verify" in res.publish_error


def test_a_trial_that_cannot_meet_a_gate_stops_after_its_last_training_stage(write_recipe,
                                                                             tmp_path):
    s = make_search(write_recipe, tmp_path, {"stages[prune].drop_layers": [[], [1]]},
                    gates={"max_accuracy_drop": 5.0}, sampler="random", budget={"trials": 4})
    fake = Fake(tmp_path)
    rows, res = run(s, fake)
    pruned = [r for r in rows if r.state == "pruned"]
    assert pruned and all(r.params["stages[prune].drop_layers"] == "[1]" for r in pruned)
    for r in pruned:  # not stopped after prune (distill could still recover), but after distill
        assert list(r.intermediate) == ["stages[0] (prune)", "stages[1] (distill)"]
        assert r.note.startswith("after stages[1] (distill): max_accuracy_drop:")
        assert r.built + r.reused == 2  # export and quantize never ran
        report = json.loads((Path(r.report) / "report.json").read_text())
        assert report["status"] == "failed" and "no later stage wins" in report["error"]
    assert all(r.state == "complete" for r in rows if r not in pruned)
    assert res.status == "found" and res.trial(res.best).params["stages[prune].drop_layers"] \
        == "[]"


def test_median_pruner_reads_a_companion_study(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, {"stages[prune].ffn": [0.1, 0.2, 0.7]},
                    pruner="median",
                    sampler="random", startup_trials=2, budget={"trials": 8})
    rows, _ = run(s, Fake(tmp_path))
    pruned = [r for r in rows if r.state == "pruned"]
    assert pruned and all(r.params["stages[prune].ffn"] == 0.7 and "median" in r.note
                          for r in pruned)
    companion = optuna.load_study(study_name=f"{s.study_name}.pruning", storage=s.storage_url)
    assert len(companion.trials) == 8
    assert companion.trials[0].intermediate_values.keys() == {0, 1, 2, 3}  # one per stage


def test_shared_stages_are_built_once_and_counted(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, {"stages[quantize].per_channel": [True, False]},
                    sampler="random", budget={"trials": 3})
    fake = Fake(tmp_path)
    rows, res = run(s, fake)
    assert rows[0].baseline and rows[0].params == {"stages[quantize].per_channel": False}
    assert (rows[0].built, rows[0].reused) == (5, 0)  # the reference's export too
    for r in rows[1:]:  # those and prune, distill, export reused; quantize built or reused
        assert r.reused >= 4 and r.built + r.reused == 5
    assert fake.built.count("prune") == 1 and fake.built.count("quantize") == \
        len({r.params["stages[quantize].per_channel"] for r in rows})
    assert f"stage outputs built {sum(r.built for r in rows)}, reused " \
           f"{sum(r.reused for r in rows)}" in (Path(res.folder) / "report.md").read_text()


def test_no_feasible_trial_names_and_keeps_the_closest(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, SPACE, gates={"min_size_reduction": 100.0},
                    budget={"trials": 4})
    rows, res = run(s, Fake(tmp_path))
    assert res.status == "infeasible" and res.best is None and res.front == []
    ratios = {r.number: r.deltas["size_ratio"] for r in rows}
    assert res.closest == sorted(ratios, key=lambda n: -ratios[n])[:3]  # nearest 100x first
    kept = load_recipe(Path(res.folder) / "closest-1.yaml")
    assert kept.search is None and kept.name == "tiny"
    assert not (tmp_path / "reports" / "tiny" / "latest").exists()


def test_a_lost_trial_is_retried_and_not_counted(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, SPACE, budget={"trials": 2})
    s.open()
    t = s.study.ask()  # a trial whose process was killed: its owner is gone
    t.suggest_float("stages[prune].ffn", 0.1, 0.7)
    proc = subprocess.Popen(["true"])
    proc.wait()
    from compress.atomic import owner_record

    t.set_user_attr("owner", {**owner_record(), "pid": proc.pid, "pid_started": 0.0})
    lost_ffn = t.params["stages[prune].ffn"]
    resumed = make_search(write_recipe, tmp_path, SPACE, budget={"trials": 2})
    rows, res = run(resumed, Fake(tmp_path))
    states = {r.number: r.state for r in res.trials}
    assert states == {0: "lost", 1: "complete", 2: "complete"}
    assert rows[0].params["stages[prune].ffn"] == lost_ffn  # the retry ran first
    study = optuna.load_study(study_name=s.study_name, storage=s.storage_url)
    assert study.trials[1].user_attrs["retry_of"] == 0


def test_same_seed_same_trials(write_recipe, tmp_path):
    def params(tag: str, seed: int) -> list[dict]:
        s = make_search(write_recipe, tmp_path / tag, SPACE, name=f"{tag}.yaml", seed=seed,
                        startup_trials=2, budget={"trials": 6})
        return [r.params for r in run(s, Fake(tmp_path / tag))[0]]

    first = params("a", 7)
    assert first == params("b", 7)  # TPE after 2 random trials: the same, in the same order
    assert first != params("c", 8)


# ----------------------------------------------------------------------------- real stages


REAL = [{"kind": "prune", "ffn": 0.5}, {"kind": "export"}, {"kind": "quantize"}]


def test_real_search_publishes_the_best_and_reuses_shared_stages(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, {"stages[prune].ffn": [0.25, 0.75],
                                             "stages[quantize].per_channel": [True, False]},
                    gates={"min_size_reduction": 2.2}, stages=REAL, sampler="random",
                    objectives=["size", "metric"], budget={"trials": 3})
    s.open()
    rows = []
    while (row := s.run_trial()) is not None:
        rows.append(row)
    res = s.finish()
    assert rows[0].built == 4  # prune, export, quantize and the reference's ONNX export
    assert all(r.reused >= 1 for r in rows[1:])  # the reference's export, at least
    for r in rows:
        ffn = r.params["stages[prune].ffn"]
        assert r.feasible == (ffn == 0.75), (ffn, r.gates)
    assert res.status == "found" and res.trial(res.best).params["stages[prune].ffn"] == 0.75
    latest = tmp_path / "reports" / "tiny" / "latest"
    assert res.published == str(latest) and manifest.verify(latest, digests=True) == []
    assert manifest.verify(latest / "model", digests=True) == []
    best = load_recipe(res.best_recipe)
    assert best.search is None and best.name == "tiny" and best.stages[0].ffn == 0.75
    assert yaml.safe_load((latest / "recipe.yaml").read_text())["stages"][0]["ffn"] == 0.75
    assert json.loads((latest / "report.json").read_text())["recipe"] == "tiny"


def test_cli_no_feasible_trial_exits_3_naming_the_closest(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], gates={
        "min_size_reduction": 50.0}, search={"space": {"stages[prune].ffn": [0.25, 0.5]},
                                             "budget": {"trials": 2}, "sampler": "random"})
    r = CliRunner().invoke(app, ["search", str(path), "--local", "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: no trial met every gate; the closest are named above")
    assert any(ln.startswith("no trial met every gate; closest: t00") and
               "min_size_reduction" in ln for ln in lines)
    folder = next((tmp_path / "reports" / "tiny").glob("search-*"))
    assert (folder / "closest-1.yaml").is_file() and (folder / "closest-2.yaml").is_file()


def test_killed_search_resumes_from_its_study(write_recipe, tmp_path):
    """SIGKILL a `compress search --local` after its first trials: the study keeps them, the
    next run retries the trial that was running and adds the rest, repeating none."""
    path = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], search={
        "space": {"stages[prune].ffn": {"low": 0.1, "high": 0.8}}, "budget": {"trials": 3}})
    reports = tmp_path / "reports"
    args = ["search", str(path), "--local", "--reports-dir", str(reports)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = Search(load_recipe(path), reports)

    def trials() -> list:
        try:
            return optuna.load_study(study_name=s.study_name,
                                     storage=open_storage(s.storage_url)).trials
        except KeyError:  # not created yet
            return []

    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (reports / "tiny" / "search.db").exists() and \
                    sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials()) >= 1:
                break
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: t.params for t in trials()
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(before) >= 1
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    after = trials()
    complete = {t.number: t.params for t in after if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == 3 and {n: complete[n] for n in before} == before
    lost = [t for t in after if "lost" in t.user_attrs]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in lost)
    assert [t.user_attrs["retry_of"] for t in after if "retry_of" in t.user_attrs] == \
        [t.number for t in lost]
    values = [p["stages[prune].ffn"] for p in complete.values()]
    assert len(set(values)) == 3  # no trial repeated


def test_minutes_budget_starts_no_trial_that_would_end_late(write_recipe, tmp_path):
    s = make_search(write_recipe, tmp_path, SPACE, budget={"minutes": 1.0})
    s.open()
    fake = Fake(tmp_path)
    assert s.run_trial(run_stage=fake.run_stage,
                       evaluate_reference=fake.evaluate_reference,
                       time_final=fake.time_final) is not None
    own = s.study.trials[0].user_attrs["own_seconds"]
    assert 0 < own < 60 and s.more()
    s.started = time.time() - 60 + own / 2  # less time left than a trial takes
    assert not s.more() and s.stop_reason.startswith("time: a trial takes about ")
    late = make_search(write_recipe, tmp_path, SPACE, budget={"minutes": 1.0})
    late.started -= 61
    assert not late.more() and late.stop_reason == "time: 1 min budget"


def test_the_best_is_timed_against_the_recipe_as_written_in_one_window(write_recipe, tmp_path):
    """Card latencies of two trials come from different moments: the claim that the search beat
    the hand-written recipe rests on timing both final models in turns."""
    written = [{"kind": "prune", "ffn": 0.25}, {"kind": "export"}, {"kind": "quantize"}]
    s = make_search(write_recipe, tmp_path, {"stages[prune].ffn": [0.25, 0.75]},
                    gates={"min_size_reduction": 2.2}, stages=written, sampler="random",
                    objectives=["size", "metric"], budget={"trials": 3})
    s.open()
    while s.run_trial() is not None:
        pass
    res = s.finish()
    base = next(t for t in res.trials if t.baseline)
    assert base.params["stages[prune].ffn"] == 0.25 and not base.feasible
    assert res.best is not None and res.best != base.number
    h = res.versus_written
    assert h is not None and h.rounds >= 5 and len(h.ratios) == h.rounds
    assert h.reference == f"t{base.number:03d} (as written)" and h.runtime == "onnxruntime"
    assert h.low <= h.speedup <= h.high
    assert "best vs the recipe as written, timed in turns" in (
        Path(res.folder) / "report.md").read_text()
