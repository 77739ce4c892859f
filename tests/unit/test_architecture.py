"""The architecture holds: one-way layers that place every module, stage kinds named only by
their own modules, a new stage is one file, and the local path runs with Prefect unimportable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "compress"


def _layers() -> list[set[str]]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in conf["contracts"] if c["type"] == "layers"]
    return [{m.strip() for m in re.split(r"[|:]", layer)} for layer in layers]


@pytest.mark.unit
def test_every_library_module_has_a_layer():
    placed = set().union(*_layers())
    modules = {"compress." + p.stem for p in LIB.glob("*.py") if p.stem != "__init__"}
    modules |= {"compress.stages"}
    assert sorted(modules - placed) == [], "add the module to a layer in pyproject.toml"
    assert sorted(placed - modules) == []


@pytest.mark.unit
def test_no_library_file_names_a_stage_kind():
    from compress.stages import registry

    kinds = "|".join(registry())
    literal = re.compile(rf"[\"']({kinds})[\"']")
    offenders = []
    for p in LIB.rglob("*.py"):
        if p.parent.name == "stages":
            continue
        offenders += [f"{p.relative_to(ROOT)}:{i}" for i, line in
                      enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []


@pytest.mark.unit
def test_each_stage_module_registers_one_stage_of_its_own_name():
    from compress.stages import registry

    reg = registry()
    files = sorted(p.stem for p in (LIB / "stages").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(reg) == files
    assert all(cls.__module__ == f"compress.stages.{kind}" for kind, cls in reg.items())


NEW_STAGE = '''"""copy: the smallest stage there is (a test of the contract)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.artifact import ModelRef
from compress.stage import StageConfig, StageContext


class CopyConfig(StageConfig):
    """Copy the model's files unchanged."""

    kind: Literal["copy"] = "copy"
    suffix: str = Field("", description="Nothing; here to be misspelt.")

    def notes(self, info: dict[str, Any]) -> list[str]:
        return [f"copied {info['files']} files"]

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        files = [f for f in ref.dir.iterdir() if f.suffix in (".json", ".safetensors", ".txt")
                 and f.name not in ("lineage.json", "stage_info.json")]
        for f in files:
            shutil.copy2(f, out / f.name)
        return {"files": len(files)}
'''

RUN_IT = """
import json, sys
from compress.recipe import STAGES, load_recipe
from compress.errors import RecipeError
from compress.testing import run_stages
plan, cards = run_stages(sys.argv[1])
print(json.dumps({"kinds": sorted(STAGES), "notes": cards[-1].notes,
                  "accuracy": [c.metrics.value for c in cards]}))
try:
    load_recipe(sys.argv[2])
except RecipeError as e:
    print(e)
"""


@pytest.mark.e2e  # subprocesses running recipes
def test_a_new_stage_is_one_file(tmp_path, tiny_model, tiny_data):
    """Copy the library, add one file under compress/stages/, and a recipe can use the stage:
    validated (with 'did you mean'), planned, run, evaluated, its notes on the card."""
    shutil.copytree(LIB, tmp_path / "compress", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "compress" / "stages" / "copy.py").write_text(NEW_STAGE)
    from tests.conftest import recipe_dict

    good = recipe_dict(tiny_model, tiny_data, tmp_path / "out",
                       [{"kind": "prune", "ffn": 0.5}, {"kind": "copy"}])
    bad = recipe_dict(tiny_model, tiny_data, tmp_path / "out", [{"kind": "copy", "sufix": "x"}])
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", RUN_IT, str(tmp_path / "good.yaml"),
                        str(tmp_path / "bad.yaml")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    first, second = r.stdout.strip().splitlines()[-2:]
    got = json.loads(first)
    assert "copy" in got["kinds"] and re.fullmatch(r"copied \d+ files", got["notes"][0])
    assert got["accuracy"][0] == got["accuracy"][1]  # the copy is the pruned model
    assert "stages[0].sufix: unknown field; did you mean 'suffix'?" in second


BLOCK_PREFECT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "prefect_dask", "flows"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = ["compress", *sys.argv[1:]]
from compress.cli import main
main()
"""


@pytest.mark.e2e  # subprocesses running recipes
def test_local_paths_run_with_prefect_unimportable(tmp_path, tiny_model, tiny_data):
    from tests.conftest import recipe_dict

    raw = recipe_dict(tiny_model, tiny_data, tmp_path / "out",
                      [{"kind": "prune", "ffn": 0.5}, {"kind": "export"}],
                      search={"space": {"stages[0].ffn": [0.5]}, "budget": {"trials": 1}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    reports = str(tmp_path / "reports")
    for args in (["run", "r.yaml", "--local", "--reports-dir", reports],
                 ["sweep", "r.yaml", "--local", "--set", "stages[0].ffn=0.25,0.5",
                  "--reports-dir", reports],
                 ["search", "r.yaml", "--local", "--reports-dir", reports]):
        r = subprocess.run([sys.executable, "-c", BLOCK_PREFECT, *args], capture_output=True,
                           text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == \
        ["tiny", "tiny-ffn-0p25", "tiny-ffn-0p5"]
