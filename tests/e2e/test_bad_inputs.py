"""Every bad input in docs/errors.md, fed through the CLI: one clear line and the exit code.

The cases live here; a second test checks that docs/errors.md lists each one with the same
message, so the table cannot drift from what the program says.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app

pytestmark = pytest.mark.e2e
DOC = Path(__file__).parents[2] / "docs" / "errors.md"


@dataclass
class Case:
    id: str
    what: str
    edit: Callable[[dict, Path], object]  # may return raw YAML text to write instead
    message: str
    exit: int = 2
    command: str = "validate"
    args: tuple[str, ...] = ()  # more command-line arguments


def stage(**kw):
    return lambda d, _t: d.update(stages=[kw])


def data(**kw):
    return lambda d, _t: d["data"].update(kw)


def rows(values: list) -> Callable[[dict, Path], None]:
    def edit(d: dict, tmp: Path) -> None:
        p = tmp / "labels.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([[f"text {i}", v] for i, v in enumerate(values)])
        d["data"]["path"] = str(p)
    return edit


def model_copy(tmp: Path, src: str) -> Path:
    dst = tmp / "model-copy"
    shutil.copytree(src, dst)
    return dst


def corrupt(d: dict, tmp: Path) -> None:
    m = model_copy(tmp, d["model"]["path"])
    (m / "model.safetensors").write_bytes(b"this is not a safetensors file")
    d["model"]["path"] = str(m)


def gpt2(d: dict, tmp: Path) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    m = model_copy(tmp, d["model"]["path"])
    (m / "model.safetensors").unlink()
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     pad_token_id=0, num_labels=2)
    GPT2ForSequenceClassification(cfg).save_pretrained(m)
    d["model"]["path"] = str(m)


def gqa_llama(d: dict, tmp: Path) -> None:
    """A Llama with 6 query heads in 3 key/value groups, on plain text."""
    from compress.testing import make_text_file, make_tiny_llama

    d["model"] = {"path": str(make_tiny_llama(tmp / "llama", heads=6, kv_heads=3, hidden=48)),
                  "task": "causal-lm"}
    d["data"] = {"path": str(make_text_file(tmp / "text.txt", lines=60)), "max_length": 16}
    d["stages"] = [{"kind": "prune", "heads": 0.15}]


def lm(**stage_kw):
    def edit(d: dict, _t: Path) -> None:
        d["model"]["task"] = "causal-lm"
        d["stages"] = [stage_kw]
    return edit


def lm_pairs(stages: list | None = None, data_kw: dict | None = None,
             eval_kw: dict | None = None, gates: dict | None = None, text: bool = False
             ) -> Callable[[dict, Path], None]:
    """A tiny Llama on prompt/response pairs (or, with `text`, on plain text)."""
    def edit(d: dict, tmp: Path) -> None:
        from compress.testing import make_pairs_csv, make_text_file, make_tiny_llama

        d["model"] = {"path": str(make_tiny_llama(tmp / "llama")), "task": "causal-lm"}
        if text:
            d["data"] = {"path": str(make_text_file(tmp / "text.txt", lines=60)),
                         "max_length": 16}
        else:
            d["data"] = {"path": str(make_pairs_csv(tmp / "pairs.csv", rows=60)),
                         "prompt_column": "prompt", "response_column": "response",
                         "max_length": 24}
        d["data"].update(data_kw or {})
        d["evaluation"].update(eval_kw or {})
        if gates:
            d["gates"] = gates
        d["stages"] = stages or [{"kind": "distill", "max_steps": 1}]
    return edit


def other_tokenizer_student(d: dict, tmp: Path) -> None:
    from compress.testing import make_tiny_llama

    lm_pairs()(d, tmp)
    d["stages"] = [{"kind": "distill", "max_steps": 1, "student": str(
        make_tiny_llama(tmp / "other", layers=2, vocab_seed=3))}]


def empty_dir(d: dict, tmp: Path) -> None:
    (tmp / "empty").mkdir()
    d["model"]["path"] = str(tmp / "empty")


def no_weights(d: dict, tmp: Path) -> None:
    m = model_copy(tmp, d["model"]["path"])
    (m / "model.safetensors").unlink()
    d["model"]["path"] = str(m)


def bad_config(d: dict, tmp: Path) -> None:
    m = model_copy(tmp, d["model"]["path"])
    (m / "config.json").write_text("{ not json")
    d["model"]["path"] = str(m)


def gguf_file(d: dict, tmp: Path) -> None:
    (tmp / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    d["model"]["path"] = str(tmp / "model.gguf")


def truncated_weights(d: dict, tmp: Path) -> None:
    m = model_copy(tmp, d["model"]["path"])
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4096])
    d["model"]["path"] = str(m)


def texts(values: list[str | None], fmt: str = "csv") -> Callable[[dict, Path], None]:
    """Rows with these texts (labels alternate 0/1); None: an empty field."""
    def edit(d: dict, tmp: Path) -> None:
        p = tmp / f"texts.{fmt}"
        rows = [{"text": t, "label": i % 2} for i, t in enumerate(values)]
        if fmt == "jsonl":
            p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        else:
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows([[r["text"] or "", r["label"]] for r in rows])
        d["data"]["path"] = str(p)
    return edit


def labels_json(values: list) -> Callable[[dict, Path], None]:
    def edit(d: dict, tmp: Path) -> None:
        p = tmp / "labels.jsonl"
        p.write_text("\n".join(json.dumps({"text": f"good film {i}", "label": v})
                               for i, v in enumerate(values)) + "\n")
        d["data"]["path"] = str(p)
    return edit


def search(space: dict | None = None, **block) -> Callable[[dict, Path], None]:
    """A search block on the default recipe (prune, export, quantize)."""
    def edit(d: dict, _t: Path) -> None:
        d["search"] = {"space": {"stages[prune].ffn": [0.25, 0.5]} if space is None else space,
                       "budget": {"trials": 2}, **block}
    return edit


def two_prunes(d: dict, t: Path) -> None:
    d["stages"].insert(0, {"kind": "prune", "ffn": 0.25})
    search()(d, t)


def unknown_format(d: dict, tmp: Path) -> None:
    (tmp / "data.xyz").write_text("x")
    d["data"]["path"] = str(tmp / "data.xyz")


CASES = [
    Case("malformed-yaml", "YAML that does not parse",
         lambda d, t: "name: x\nstages: [\n  - kind: prune\n", "not valid YAML"),
    Case("not-a-mapping", "a YAML list instead of a recipe",
         lambda d, t: "- a\n- b\n", "a recipe is a mapping"),
    Case("unknown-key", "a misspelt top-level key", lambda d, t: d.update(modle={}),
         "modle: unknown field; did you mean 'model'?"),
    Case("unknown-stage-key", "a misspelt stage setting", stage(kind="prune", heds=0.5),
         "stages[0].heds: unknown field; did you mean 'heads'?"),
    Case("wrong-type", "text where a number belongs", data(max_length="long"),
         "data.max_length: Input should be a valid integer"),
    Case("unknown-kind", "a stage kind that does not exist", stage(kind="sparsify"),
         "stages[0].kind: unknown stage kind 'sparsify'"),
    Case("missing-kind", "a stage without a kind", stage(ffn=0.5),
         "stages[0]: every stage needs a 'kind'"),
    Case("quantize-first", "quantize with no export before it", stage(kind="quantize"),
         "needs an ONNX model; add '- kind: export' before it"),
    Case("prune-after-export", "a PyTorch stage after export",
         lambda d, t: d.update(stages=[{"kind": "export"}, {"kind": "prune", "ffn": 0.5}]),
         "works on PyTorch models but comes after export"),
    Case("finetune-late", "finetune after a compression stage",
         lambda d, t: d.update(stages=[{"kind": "prune", "ffn": 0.5}, {"kind": "finetune"}]),
         "finetune prepares the reference model and must come before"),
    Case("no-stages", "an empty stage list", lambda d, t: d.update(stages=[]),
         "stages: List should have at least 1 item"),
    Case("bad-name", "a recipe name that cannot name folders and artifacts",
         lambda d, t: d.update(name="My Recipe"), "name: String should match pattern"),
    Case("missing-model", "a model folder that does not exist",
         lambda d, t: d["model"].update(path="/nonexistent/model"),
         "model.path: /nonexistent/model: no such folder"),
    Case("not-a-model", "a folder that is not a model", empty_dir,
         "is not a model folder (no config.json)"),
    Case("corrupt-weights", "a corrupt model.safetensors", corrupt,
         "cannot load a model from"),
    Case("unsupported-arch", "pruning an architecture not supported (found before any work)",
         gpt2, "stages[0] (prune): architecture 'gpt2' is not supported (supported: bert"),
    Case("hub-offline", "a hub id with no network and no cache",
         lambda d, t: d["model"].update(path="someorg/some-model"),
         "is not a local folder and not in the hub cache (HF_HUB_OFFLINE=1)"),
    Case("missing-data", "a data file that does not exist", data(path="/nonexistent/d.csv"),
         "data.path: /nonexistent/d.csv: no such file"),
    Case("hub-data-offline", "a hub dataset with no network", data(path="someorg/some-data"),
         "data.path: hub dataset 'someorg/some-data' cannot be loaded"),
    Case("unknown-data-format", "a data file of unknown format", unknown_format,
         "cannot tell the format of data.xyz; set data.format"),
    Case("wrong-text-column", "a text column the data does not have",
         data(text_column="review"),
         "data.text_column: column 'review' not in the data (columns: text, label)"),
    Case("wrong-label-column", "a label column the data does not have",
         data(label_column="sentiment"), "data.label_column: column 'sentiment' not in the data"),
    Case("label-out-of-range", "labels beyond num_labels",
         lambda d, t: (rows([0, 1, 2, 3, 4] * 4)(d, t), d["model"].update(num_labels=2)),
         "data.label_column: label 4 out of range for model.num_labels=2"),
    Case("negative-label", "a negative class id", rows([0, 1, -1, 1] * 4),
         "data.label_column: label -1 is negative"),
    Case("empty-data", "a data file with a header and no rows", rows([]),
         "has no usable rows"),
    Case("too-few-rows", "too few rows to split off an eval set", rows([0, 1]),
         "too few to split off an eval set"),
    Case("eval-fraction", "an eval split larger than the data", data(eval_fraction=1.5),
         "data.eval_fraction: Input should be less than 1"),
    Case("prune-ratio-1", "a prune ratio of 1 or more", stage(kind="prune", ffn=1.0),
         "stages[0].ffn: Input should be less than 1"),
    Case("prune-nothing", "a prune stage that prunes nothing", stage(kind="prune"),
         "stages[0]: prunes nothing: set heads, ffn, drop_layers or depth"),
    Case("heads-round-to-zero", "a head ratio too small for the model",
         stage(kind="prune", heads=0.1), "prune.heads: 0.1 of 4 heads rounds to none", exit=1,
         command="run"),
    Case("missing-layer", "dropping a layer the model does not have",
         stage(kind="prune", drop_layers=[9]), "prune.drop_layers: layer 9 does not exist",
         exit=1, command="run"),
    Case("temperature-zero", "a distillation temperature of 0",
         stage(kind="distill", temperature=0),
         "stages[0].temperature: Input should be greater than 0"),
    Case("batch-size-zero", "a batch size of 0", stage(kind="distill", batch_size=0),
         "stages[0].batch_size: Input should be greater than or equal to 1"),
    Case("cache-with-hidden", "a teacher cache with hidden-state matching",
         stage(kind="distill", teacher_cache=True, hidden={"weight": 1.0}),
         "teacher_cache keeps logits of one teacher only"),
    Case("layer-map-range", "a layer map naming a layer that does not exist",
         stage(kind="distill", max_steps=1, hidden={"layer_map": [[9, 1]]}),
         "distill.hidden.layer_map: (9, 1) is out of range", exit=1, command="run"),
    Case("parity-failure", "ONNX output that does not match PyTorch",
         stage(kind="export", atol=1e-12), "export: ONNX output differs from PyTorch by",
         exit=1, command="run"),
    Case("gqa-ratio", "a head ratio that splits key/value groups (GQA)", gqa_llama,
         "prune.heads: 0.15 does not remove a whole number of the 3 key/value groups; ratios "
         "that work: 0.333, 0.667", exit=1, command="run"),
    Case("depth-all-layers", "depth pruning that would remove every layer",
         stage(kind="prune", depth=4), "prune.depth: cannot drop 4 of the 4 layers",
         exit=1, command="run"),
    Case("int4-classifier", "INT4 MatMulNBits for a classifier",
         lambda d, t: d.update(stages=[{"kind": "export"}, {"kind": "quantize",
                                                             "method": "int4"}]),
         "int4 (MatMulNBits) is for causal LMs"),
    Case("block-size", "an INT4 block size that is not a power of 2",
         stage(kind="quantize", block_size=48), "48 is not a power of 2"),
    Case("exclude-no-match", "a quantize exclude pattern that matches no node",
         lambda d, t: d.update(stages=[{"kind": "export"}, {"kind": "quantize",
                                                             "exclude": ["*nothing*"]}]),
         "quantize.exclude: pattern '*nothing*' matches no node", exit=1, command="run"),
    Case("bnb-not-last", "a bitsandbytes stage followed by another stage",
         lambda d, t: d.update(stages=[{"kind": "bnb"}, {"kind": "export"}]),
         "bnb must be the last stage"),
    Case("cache-divergence", "a teacher cache with reverse KL or JSD",
         stage(kind="distill", teacher_cache=True, divergence="jsd"),
         "the top-k cache supports divergence 'kl' only"),
    Case("int8-teacher-cpu", "an 8-bit (bitsandbytes) teacher on a machine with no GPU",
         stage(kind="distill", max_steps=1, teacher_dtype="int8"),
         "distill.teacher_dtype: int8 (bitsandbytes) needs a CUDA GPU", exit=1, command="run"),
    Case("augment-classifier", "teacher-generated text for a classifier",
         stage(kind="distill", augment={"prompts": 2}),
         "teacher-generated text needs model.task causal-lm"),
    Case("lm-attention", "attention-map matching for a causal LM",
         lm(kind="distill", attention_weight=1.0), "attention-map matching is for encoders"),
    Case("binary-recipe", "a binary file as the recipe",
         lambda d, t: b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary",
         "not a text file (a recipe is UTF-8 YAML)"),
    Case("no-weights", "a model folder with config and tokenizer but no weights", no_weights,
         "has a config.json but no weights (*.safetensors, *.bin or *.onnx)"),
    Case("bad-config-json", "a config.json that is not JSON", bad_config,
         "config.json is not valid JSON"),
    Case("truncated-weights", "a model.safetensors cut short", truncated_weights,
         "model.safetensors is corrupt (Error while deserializing header"),
    Case("gguf-model-path", "a .gguf file as model.path", gguf_file,
         "is a GGUF file; convert it to a save_pretrained folder first"),
    Case("same-columns", "the label column is the text column",
         data(label_column="text"), "data.label_column: 'text' is also a text column"),
    Case("all-texts-empty", "every text empty",
         texts([None] * 40), "has no usable rows (40 read; dropped: empty text: 40)"),
    Case("some-labels-empty", "a fifth of the labels empty or NaN (warned, run goes on)",
         rows([0, 1, 0, "", 1] * 20), "data: 20 of 100 train rows dropped (empty label: 20)",
         exit=0),
    Case("null-labels-jsonl", "null labels in JSONL (warned, run goes on)",
         labels_json([0, 1, None, 1, 0, 1, 0, 1, 0, 1] * 8),
         "data: 8 of 80 train rows dropped (empty label: 8)", exit=0),
    Case("third-texts-empty", "a third of the texts empty (warned, run goes on)",
         texts(["a good film", "a dull film", None] * 30),
         "data: 30 of 90 train rows dropped (empty text: 30)", exit=0),
    Case("genai-classifier", "the genai export route for a classifier",
         stage(kind="export", route="genai"), "route: genai builds causal LMs"),
    Case("optimize-lm", "transformer fusions for a causal LM",
         lambda d, t: (lm(kind="export")(d, t), d["stages"].append({"kind": "optimize"})),
         "the transformer fusions are for encoder classifiers"),
    Case("static-after-optimize", "static INT8 after the fusions",
         lambda d, t: d.update(stages=[{"kind": "export"}, {"kind": "optimize"},
                                       {"kind": "quantize", "method": "static"}]),
         "static INT8 cannot follow the fusions"),
    Case("vocab-before-distill", "vocabulary trimming before distillation",
         lambda d, t: d.update(stages=[{"kind": "prune", "ffn": 0.5}, {"kind": "trim_vocab"},
                                       {"kind": "distill"}]),
         "stages[1] (trim_vocab): comes before distill, which needs the reference's own "
         "vocabulary"),
    Case("vocab-extra-missing", "an extra_text file that does not exist",
         stage(kind="trim_vocab", extra_text="/nonexistent/words.txt"),
         "stages[0] (trim_vocab).extra_text: /nonexistent/words.txt: no such file"),
    Case("positive-label-unknown", "an F1 positive class the data does not have",
         lambda d, t: d["evaluation"].update(metric="f1", positive_label="maybe"),
         "evaluation.positive_label: 'maybe' is not a class of the data (classes: 0-1)"),
    Case("lm-accuracy", "accuracy as the metric of a causal LM",
         lambda d, t: (lm(kind="distill")(d, t), d["evaluation"].update(metric="accuracy")),
         "evaluation.metric: accuracy needs task sequence-classification"),
    Case("pairs-half", "a prompt column without a response column",
         lm_pairs(data_kw={"response_column": None}),
         "data.prompt_column and data.response_column go together"),
    Case("pairs-classifier", "prompt/response columns for a classifier",
         lambda d, t: d["data"].update(prompt_column="text", response_column="label"),
         "data.prompt_column: prompt/response pairs need model.task causal-lm"),
    Case("prompt-column-missing", "a prompt column the data does not have",
         lm_pairs(data_kw={"prompt_column": "question"}),
         "data.prompt_column: column 'question' not in the data (columns: prompt, response)"),
    Case("template-placeholder", "a prompt template without {prompt}",
         lm_pairs(data_kw={"template": "Review:"}), "data.template: must contain {prompt}"),
    Case("pairs-perplexity", "perplexity as the metric of prompt/response data",
         lm_pairs(eval_kw={"metric": "perplexity"}),
         "evaluation.metric: perplexity scores plain text; on prompt/response data use "
         "response_perplexity"),
    Case("answer-metric-text", "answer accuracy on plain text",
         lm_pairs(eval_kw={"metric": "answer_accuracy"}, text=True),
         "evaluation.metric: answer_accuracy needs prompt/response data"),
    Case("choices-missing", "choice accuracy without choices",
         lm_pairs(eval_kw={"metric": "choice_accuracy"}),
         "evaluation.metric: choice_accuracy needs evaluation.choices"),
    Case("probe-missing", "a probe text that does not exist",
         lm_pairs(eval_kw={"probe_data": "/nonexistent/probe.txt"}),
         "evaluation.probe_data: /nonexistent/probe.txt: no such file"),
    Case("probe-classifier", "a perplexity probe for a classifier",
         lambda d, t: d["evaluation"].update(probe_data="/nonexistent/probe.txt"),
         "evaluation.probe_data: the probe is a perplexity; it needs model.task causal-lm"),
    Case("probe-gate-alone", "a probe gate without a probe",
         lm_pairs(gates={"max_probe_increase": 0.5}),
         "gates.max_probe_increase needs evaluation.probe_data"),
    Case("sequence-level-text", "sequence-level KD on plain text",
         lm_pairs([{"kind": "distill", "alpha": 0.0, "sequence_level": {}}], text=True),
         "stages[0] (distill).sequence_level: the teacher answers prompts; it needs "
         "prompt/response data"),
    Case("augment-pairs", "teacher-continued text on prompt/response data",
         lm_pairs([{"kind": "distill", "augment": {"prompts": 2}}]),
         "distill).augment: continues plain training text; on prompt/response data use "
         "sequence_level"),
    Case("student-not-a-model", "a distill student that is not a model folder",
         lm_pairs([{"kind": "distill", "student": "/nonexistent/student"}]),
         "(distill): student: /nonexistent/student is not a model folder"),
    Case("mutual-cached", "co-distillation with a cached teacher",
         lm_pairs([{"kind": "distill", "mutual": True, "teacher_cache": True}]),
         "mutual: the teacher trains with the student, so it cannot be cached"),
    Case("rationale-placeholder", "a rationale instruction without {prompt}",
         lm_pairs([{"kind": "distill", "rationale": {"instruction": "Explain."}}]),
         "rationale.instruction: must contain {prompt}"),
    Case("student-other-tokenizer", "soft KD into a student with another tokenizer",
         other_tokenizer_student, "use sequence_level and alpha 0 (hard-label KD needs no "
         "shared vocabulary)", exit=1, command="run"),
    Case("unwritable-output", "an output root that cannot be written",
         lambda d, t: d.update(output_root="/proc/compress-outputs"),
         "output_root: cannot write to /proc/compress-outputs"),
    Case("search-unknown-field", "a search path naming a field the stage does not have",
         search({"stages[prune].hedas": [0.5]}),
         "search.space.stages[prune].hedas: stages[0] has no field 'hedas'; did you mean "
         "'heads'?"),
    Case("search-unknown-stage", "a search path naming no stage of the recipe",
         search({"stages[sparsify].ffn": [0.5]}),
         "search.space.stages[sparsify].ffn: no item of stages is named or of kind 'sparsify'"),
    Case("search-two-of-a-kind", "a stage chosen by kind when two stages have it",
         two_prunes, "search.space.stages[prune].ffn: 2 items of stages match 'prune' "
         "(stages[0], stages[1]); give each a name"),
    Case("search-range-not-numeric", "a range on a field that is not a number",
         search({"stages[quantize].per_channel": {"low": 0, "high": 1}}),
         "search.space.stages[quantize].per_channel: a range needs a numeric field; "
         "stages[2].per_channel is bool"),
    Case("search-fraction-for-int", "a fractional range on a whole-number field",
         search({"stages[prune].depth": {"low": 0.5, "high": 2}}),
         "search.space.stages[prune].depth: stages[0].depth is a whole number"),
    Case("search-bad-value", "a searched value the stage refuses",
         search({"stages[prune].ffn": {"low": 0.25, "high": 1.0}}),
         "search.space.stages[prune].ffn: 1.0 makes a bad recipe: stages[0].ffn: Input should "
         "be less than 1"),
    Case("search-single-value", "one value where choices or a range belong",
         search({"stages[prune].ffn": 0.5}),
         "search.space: stages[prune].ffn: give a list of choices ([a, b]) or a range"),
    Case("search-same-field", "one field listed twice (by kind and by index)",
         search({"stages[prune].ffn": [0.5], "stages[0].ffn": [0.25]}),
         "search.space.stages[prune].ffn: the same field as search.space.stages[0].ffn"),
    Case("search-empty-space", "a search with nothing to search",
         search({}), "search.space: empty: name at least one field to search"),
    Case("search-optional-export", "an optional stage the rest of the recipe needs",
         search({"stages[export].enabled": [True, False]}),
         "search.space: without stages[1] (export) the recipe is bad: stages[1] (quantize): "
         "needs an ONNX model"),
    Case("search-enabled-not-bool", "an optional stage switched by something else than true "
         "or false", search({"stages[prune].enabled": ["yes"]}),
         "search.space.stages[prune].enabled: whether a stage runs is a choice: [true, false]"),
    Case("search-zero-budget", "a search budget of 0 trials",
         lambda d, t: (search()(d, t), d["search"].update(budget={"trials": 0})),
         "search.budget.trials: Input should be greater than or equal to 1"),
    Case("search-no-budget", "a search budget with neither trials nor minutes",
         lambda d, t: (search()(d, t), d["search"].update(budget={})),
         "search.budget: set trials, minutes or both"),
    Case("search-unknown-objective", "an objective that is not measured",
         search(objectives=["speed"]), "search.objectives: 'speed' is not an objective"),
    Case("search-objective-task", "an objective the task does not measure",
         search(objectives=["perplexity", "size"]),
         "search.objectives: perplexity is not measured for sequence-classification"),
    Case("search-storage-url", "a study storage that is not a database URL",
         search(storage="redis://localhost/0"),
         "search.storage: redis://localhost/0: not a database URL"),
    Case("search-no-block", "`compress search` on a recipe without a search block",
         lambda d, t: None, "the recipe has no search: block", command="search"),
    Case("search-zero-trials", "`--trials 0` on the command line", search(),
         "--trials 0: a search needs at least 1 trial", command="search", args=("--trials", "0")),
    Case("search-local-workers", "`--workers 2` with `--local`", search(),
         "--workers 2: --local runs one trial at a time", command="search",
         args=("--workers", "2")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case: Case, write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "heads": 0.5}, {"kind": "export"},
                         {"kind": "quantize"}])
    d = yaml.safe_load(path.read_text())
    raw = case.edit(d, tmp_path)
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(d))
    args = [case.command, str(path)]
    if case.command in ("run", "search"):
        args += ["--local", "--reports-dir", str(tmp_path / "reports")]
    args += case.args
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == case.exit, r.output
    assert "Traceback" not in r.output
    if case.exit == 0:  # a warning: said once, and the run goes on
        warnings = [ln for ln in lines if ln.startswith("warning: ")]
        assert len(warnings) == 1 and case.message in warnings[0], r.output
        assert not [ln for ln in lines if ln.startswith("error: ")]
        return
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], r.output
    assert case.message in errors[0]
    assert "Traceback" not in r.output
    if case.command == "validate":
        assert len(lines) == 1


def test_docs_list_every_case_with_its_message():
    doc = DOC.read_text()
    rows = {m.group(1): (m.group(2), int(m.group(3)))
            for m in re.finditer(r"^\| `([\w-]+)` \|[^|]*\| `(.+?)` \| (\d) \|$", doc, re.M)}
    assert len(CASES) >= 25
    for c in CASES:
        assert c.id in rows, f"docs/errors.md has no row for {c.id}"
        assert rows[c.id] == (c.message, c.exit), c.id
