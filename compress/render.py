"""Markdown renderings of report data: the card table (also the Prefect table artifact), the
whole card, the diagnosis section and a run comparison. Pure functions of report data."""

from __future__ import annotations

from compress.compare import Comparison
from compress.measure import Latency
from compress.report import Diagnosis, RunReport, StageCard, deltas, latency


def _ms(x: Latency | None, digits: int = 2) -> str:
    """p50 in ms; `~` marks a figure whose timing rounds disagreed by more than 20%."""
    if x is None:
        return "–"
    return f"{x.p50_ms:.{digits}f}" + ("~" if x.noisy else "")


def _row(report: RunReport, card: StageCard, batch: int) -> list[str]:
    m = card.metrics
    d = deltas(report, card)
    ref = card is report.reference
    metric = f"{m.value:.2f}" if m.metric != "perplexity" else f"{m.value:.2f} ppl"
    if d and not ref:
        metric += f" ({d['metric_change']:+.2f})"
    b1 = latency(card, 1) or m.latency[0]
    bn = latency(card, batch) or b1
    speed = ""
    if d and not ref:
        speed = f" ({d['speedup_b1']:.2f}x)" if d["speedup_b1"] is not None else " (–)"
    size = f"{m.size_bytes / 1e6:.1f}" + (f" ({d['size_ratio']:.2f}x)" if d and not ref else "")
    med = latency(card, 1, "median")
    return [
        card.name + (" ♻" if card.reused else ""), m.runtime, metric,
        f"{_ms(b1)}{speed}", f"{b1.p90_ms:.2f} / {b1.p99_ms:.2f}", _ms(bn, 1),
        _ms(med) + (f" @{med.sequence_length}" if med else ""),
        f"{m.parameters / 1e6:.2f}M", "–" if m.macs is None else f"{m.macs / 1e9:.3g}", size,
        f"{m.peak_rss_mb:.0f}",
    ]


def table(report: RunReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the stage-by-stage table (also used for Prefect table artifacts)."""
    cards = report.cards()
    batch = max((x.batch_size for c in cards for x in c.metrics.latency), default=1)
    metric = cards[0].metrics.metric if cards else "accuracy"
    fixed = next((x.sequence_length for c in cards for x in c.metrics.latency
                  if x.length == "max"), 0)
    head = ["stage", "runtime", f"{metric} (Δ)", f"p50 b1 ms @{fixed} (speed-up)",
            "p90 / p99 b1 ms", f"p50 b{batch} ms", "p50 b1 ms @median len", "params", "GMACs",
            "size MB (smaller)", "peak RSS MB"]
    return head, [_row(report, c, batch) for c in cards]


def one_line(report: RunReport, card: StageCard) -> str:
    """A card in one line, for logs: metric (change), size (smaller), p50 at batch 1 (faster)."""
    m, d = card.metrics, deltas(report, card)
    first = card is report.reference or not d
    metric = f"{m.metric} {m.value:.2f}" + ("" if first else f" ({d['metric_change']:+.2f})")
    size = f"{m.size_bytes / 1e6:.1f} MB" + ("" if first else f" ({d['size_ratio']:.2f}x smaller)")
    b1 = latency(card, 1) or m.latency[0]
    speed = f"p50 b1 {_ms(b1)} ms" + ("" if first or d["speedup_b1"] is None
                                      else f" ({d['speedup_b1']:.2f}x)")
    return f"{card.name}{' (reused)' if card.reused else ''}: {metric}, {size}, {speed}"


def _data_lines(report: RunReport) -> list[str]:
    out = []
    for split, a in report.data.items():
        dropped = ", ".join(f"{k} {v}" for k, v in a.get("dropped", {}).items() if v)
        out.append(f"- data `{split}`: {a.get('read')} rows read, {a.get('kept')} used"
                   + (f" (dropped: {dropped})" if dropped else ""))
    return out


def _notes(report: RunReport) -> list[str]:
    notes = []
    for c in [x for s in report.stages for x in (s, *s.side)]:  # side outputs have notes too
        parity = c.info.get("parity")
        if parity:
            notes.append(f"- {c.name}: ONNX vs {parity.get('against', 'PyTorch')} max "
                         f"|Δlogit| = {parity['max_abs_diff']:.2e} (atol {parity['atol']:g}) on "
                         f"{parity['samples']} examples")
        tr = c.info.get("training")
        if tr:
            tokens = f", {tr['tokens_per_s']} tokens/s" if tr.get("tokens_per_s") else ""
            notes.append(f"- {c.name}: {tr['steps']} steps, final loss {tr['final_loss']}, "
                         f"{tr['samples_per_s']} samples/s{tokens} on {tr['device']} "
                         f"({tr['precision']}, {tr.get('processes', 1)} process(es))")
        notes += [f"- {c.name}: {n}" for n in c.notes]
        notes += [f"- ⚠ {c.name}: {w}" for w in c.warnings]
    if report.reference:
        notes += [f"- ⚠ {report.reference.name}: {w}" for w in report.reference.warnings]
    scores = [c for c in report.cards() if len(c.metrics.all_scores()) > 1]
    if scores:
        notes += [f"- {c.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                              c.metrics.all_scores().items()) for c in scores]
    return notes


def render_markdown(report: RunReport) -> str:
    head, rows = table(report)
    lines = [f"# {report.recipe} — run {report.run_id}", "",
             f"Status: **{report.status}**  ·  started {report.started_at}"
             + (f"  ·  finished {report.finished_at}" if report.finished_at else ""), ""]
    if report.error:
        lines += [f"> Error: {report.error}", ""]
    lines += [f"> ⚠ {w}" for w in report.warnings] + ([""] if report.warnings else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Deltas and ratios are against the reference (first row); ONNX rows compare "
              "with the reference timed in ONNX Runtime fp32, PyTorch rows with the reference in "
              "PyTorch (– : no like-for-like reference). ♻ = reused from an earlier run. "
              "~ = the timing rounds disagreed by more than 20% (a busy machine): do not trust "
              "ratios of it. GMACs: weight matmuls for one sequence of the timed length.", ""]
    h = report.head_to_head
    if h is not None:
        lines += [f"Final speed-up, timed head to head: **{h.speedup:.2f}x** ({h.candidate} vs "
                  f"{h.reference}, {h.runtime}, {h.what}, {h.rounds} rounds in turns, "
                  f"per-round {h.low:.2f}-{h.high:.2f}x" + (", noisy" if h.noisy else "")
                  + ").", ""]
    if report.gates:
        lines += ["## Gates", ""]
        lines += [f"- {'PASS' if g.passed else 'FAIL'} `{g.gate}`: {g.message}"
                  for g in report.gates]
        lines.append("")
    if report.diagnosis:
        lines += diagnosis_lines(report.diagnosis)
    notes = _data_lines(report) + _notes(report)
    if notes:
        lines += ["## Stage notes", "", *notes, ""]
    env = report.environment
    if env:
        cpu = env.get("cpu", {})
        pk = env.get("packages", {})
        lines += ["## Environment", "",
                  f"- CPU: {cpu.get('model')} ({cpu.get('arch')}, {cpu.get('logical_cores')} "
                  f"logical cores), flags: {', '.join(cpu.get('flags', [])) or 'none'}",
                  f"- threads: {env.get('threads')}  ·  python {env.get('python')}  ·  "
                  f"git {env.get('git_commit')}" + (f"  ·  GPU {env['gpu']}" if 'gpu' in env
                                                    else ""),
                  "- " + ", ".join(f"{k} {v}" for k, v in pk.items() if v), ""]
    return "\n".join(lines)


def search_lines(dg: Diagnosis) -> list[str]:
    """The `search:` block that explores the fix, ready to paste."""
    if not dg.search:
        return []
    return ["To explore the fix, add this block to the recipe and run `compress search "
            "RECIPE` (the gates are its constraints):", "", "```yaml",
            *dg.search.rstrip().splitlines(), "```", ""]


def diagnosis_lines(dg: Diagnosis) -> list[str]:
    """The card's diagnosis section: a ranked table (top N) and the suggestion; for a size or
    speed gate, where the bytes or milliseconds are. Then the search block, if any."""
    if dg.method in ("size", "speed"):
        return [f"## Diagnosis: {dg.gate}", "", dg.suggestion, "", *search_lines(dg)]
    lines = [f"## Diagnosis: stages[{dg.stage_index}] ({dg.stage})", ""]
    if dg.error:
        return [*lines, f"No layer-by-layer diagnosis: {dg.error}", "", *search_lines(dg)]
    cls = dg.baseline is not None
    lines.append(f"Each layer group quantized alone (dynamic INT8), {dg.samples} eval examples, "
                 f"ranked by {dg.method}" + (" then output error" if dg.method == "accuracy"
                                             else "") + "."
                 + (f" fp32 {dg.baseline:.2f} → all quantized {dg.compressed:.2f}."
                    if cls and dg.compressed is not None else ""))
    lines.append("")
    head = ["#", "layer group", "nodes"] + (["accuracy (Δ)"] if cls else []) + \
        ["output KL vs fp32"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(dg.rows[:dg.top], 1):
        cells = [str(i), f"`{r.group}`", str(r.nodes)]
        if cls:
            cells.append(f"{r.metric:.2f} ({r.delta:+.2f})")
        cells.append(f"{r.output_error:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"Suggestion: {dg.suggestion}", "", *search_lines(dg)]


def _cell(x: str) -> str:
    return x.replace("|", "\\|")


def comparison_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table, one row per stage pair."""
    lines = ["| stage | metric a → b (Δ) | p50 b1 ms a → b (Δ%) | size MB a → b |",
             "|---|---|---|---|"]
    for r in c.rows:
        metric = " → ".join(f"{v:.2f}" if v is not None else "—" for v in r.metric)
        if None not in r.metric:
            metric += f" ({r.metric[1] - r.metric[0]:+.2f})"
        lat = " → ".join(f"{v:.2f}" if v else "—" for v in r.p50_b1)
        if all(r.p50_b1):
            lat += f" ({r.p50_b1[1] / r.p50_b1[0] - 1:+.1%})"
        size = " → ".join(f"{v / 1e6:.1f}" if v is not None else "—" for v in r.size_bytes)
        lines.append(f"| {_cell(r.label)} | {metric} | {lat} | {size} |")
    return "\n".join(lines)


def _snippet(report: RunReport, max_length: int) -> list[str]:
    """Ten lines that run the published model, in the runtime it was measured in."""
    final = report.final
    assert final is not None
    if final.model.format == "onnx" and final.model.task == "causal-lm":
        return ["```python",
                "from optimum.onnxruntime import ORTModelForCausalLM",
                "from transformers import AutoTokenizer",
                "",
                'tok = AutoTokenizer.from_pretrained("model")',
                f'lm = ORTModelForCausalLM.from_pretrained("model", '
                f'file_name="{final.model.onnx_file}", use_cache=True)',
                'ids = tok("To be, or not to be", return_tensors="pt")',
                "out = lm.generate(**ids, max_new_tokens=32, do_sample=False)",
                "print(tok.decode(out[0], skip_special_tokens=True))",
                "```"]
    if final.model.format == "onnx":
        return ["```python",
                "import numpy as np, onnxruntime as ort",
                "from transformers import AutoTokenizer",
                "",
                'tok = AutoTokenizer.from_pretrained("model")',
                "opts = ort.SessionOptions()  # graph optimizations: see model/ort_session.json",
                f'session = ort.InferenceSession("model/{final.model.onnx_file}", opts, '
                'providers=["CPUExecutionProvider"])',
                f'enc = tok(["a fine, moving film"], truncation=True, max_length={max_length}, '
                'return_tensors="np")',
                "feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}",
                "print(session.run(None, feed)[0].argmax(-1))",
                "```"]
    auto = "AutoModelForCausalLM" if final.model.task == "causal-lm" else \
        "AutoModelForSequenceClassification"
    return ["```python",
            f"from transformers import AutoTokenizer, {auto}",
            "",
            'tok = AutoTokenizer.from_pretrained("model")',
            f'model = {auto}.from_pretrained("model").eval()',
            'print(model(**tok(["a fine, moving film"], return_tensors="pt")).logits)',
            "```"]


def model_card(report: RunReport, recipe: object | None = None) -> str:
    """README.md of a published package, in the Hugging Face model-card style: what it is,
    where it came from, how it compares with the original, what it was tuned for, how to run
    it. `recipe` is the compress.recipe.Recipe that made it (None: less to say)."""
    final, ref = report.final, report.reference
    assert final is not None and ref is not None
    rec: dict = recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else {}
    m, r = final.metrics, ref.metrics
    lfl = report.like_for_like(final) or ref
    speed = lfl.metrics.latency[0].p50_ms / max(final.metrics.latency[0].p50_ms, 1e-9)
    lines = ["---", f"base_model: {rec.get('model', {}).get('path', ref.model.path)}",
             f"pipeline_tag: {'text-generation' if final.model.task == 'causal-lm' else 'text-classification'}",  # noqa: E501
             "library_name: onnxruntime" if final.model.format == "onnx" else
             "library_name: transformers",
             "tags: [compress, " + ", ".join(c.kind for c in report.stages) + "]", "---", "",
             f"# {report.recipe}", "",
             f"Made by `compress` run `{report.run_id}` ({report.finished_at or report.started_at})"
             f": every gate passed. Format: {final.model.format}"
             + (f" (`model/{final.model.onnx_file}`)" if final.model.onnx_file else "")
             + f"; task: {final.model.task}.", "",
             "## Against the original", "",
             "| | reference | this model |", "|---|---|---|",
             f"| {m.metric} | {r.value:.2f} | {m.value:.2f} |"]
    for name, value in m.scores.items():
        if name != m.metric and name in r.scores:
            lines.append(f"| {name} | {r.scores[name]:.2f} | {value:.2f} |")
    lines += [f"| size on disk (MB) | {r.size_bytes / 1e6:.1f} | {m.size_bytes / 1e6:.1f} |",
              f"| parameters | {r.parameters / 1e6:.2f}M | {m.parameters / 1e6:.2f}M |",
              f"| p50 batch 1 (ms, {lfl.metrics.runtime}) | {lfl.metrics.latency[0].p50_ms:.2f} "
              f"| {m.latency[0].p50_ms:.2f} ({speed:.2f}x) |", ""]
    lines += [f"- {'PASS' if g.passed else 'FAIL'} `{g.gate}`: {g.message}" for g in report.gates]
    cpu = report.environment.get("cpu", {})
    target = next((c.info.get("quantization", {}).get("target") for c in report.stages
                   if c.info.get("quantization")), None)
    lines += ["", "## Lineage", "", f"- source: `{ref.model.path}` (id {ref.model.short})"]
    lines += [f"- {c.kind} `{c.name}` → id {c.model.short}" for c in report.stages]
    lines += ["", "## Target", "",
              f"Measured on {cpu.get('model', 'an unrecorded CPU')} "
              f"({report.environment.get('threads', '?')} threads"
              + (f", flags {', '.join(cpu.get('flags', []))}" if cpu.get("flags") else "") + ")"
              + (f"; quantized for the `{target}` preset." if target else "."), "",
              "## Run it", "", *_snippet(report, rec.get("data", {}).get("max_length", 128)), "",
              "`manifest.json` lists every file with its sha256; `recipe.yaml` re-makes the "
              "model; `report.json` is the full report card.", ""]
    return "\n".join(lines)
