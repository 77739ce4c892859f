"""The task's data: one train split and one eval split, the same eval split for every stage.

Local files go through the `datasets` library's own loaders (CSV/TSV, JSON/JSONL, Parquet, text);
anything else is treated as a hub id. Problems surface as one-line RecipeErrors before any work.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.artifact import canonical_hash, files_hash
from compress.errors import RecipeError, first_line
from compress.logs import quiet
from compress.spec import DataSpec

PROMPT, RESPONSE, CHAT = "prompt", "response", "chat"  # the columns of prompt/response data
_SUFFIX_FORMAT = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
    ".txt": "text",
}


@dataclass(frozen=True)
class TaskData:
    # datasets.Dataset with columns text[, text_pair], label; a causal LM has no label: text
    # (plain text, cut into blocks) or prompt, response, chat (prompt/response pairs)
    train: Any
    eval: Any
    num_labels: int  # 0 for a causal LM
    label_names: tuple[str, ...] | None
    fingerprint: str
    spec: DataSpec
    # per source split: {"read": n, "kept": k, "dropped": {reason: count}}, for the card
    accounting: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def causal_lm(self) -> bool:
        return "label" not in self.train.column_names

    @property
    def instruct(self) -> bool:
        """Prompt/response pairs (a causal-LM task): losses and KD cover the response only."""
        return PROMPT in self.train.column_names

    def warnings(self, threshold: float = 0.01) -> list[str]:
        """One line per split that lost more than `threshold` of its rows (classifiers: a
        text file's blank lines are not lost rows)."""
        if self.causal_lm and not self.instruct:
            return []
        out = []
        for split, a in self.accounting.items():
            lost = a["read"] - a["kept"]
            if a["read"] and lost / a["read"] > threshold:
                why = ", ".join(f"{k}: {v}" for k, v in a["dropped"].items() if v)
                out.append(f"data: {lost} of {a['read']} {split} rows dropped ({why}); they "
                           "are left out of training and evaluation")
        return out


def _format_of(spec: DataSpec, p: Path) -> str:
    if spec.format != "auto":
        return spec.format
    fmt = _SUFFIX_FORMAT.get(p.suffix.lower())
    if fmt is None:
        raise RecipeError(
            f"data.path: cannot tell the format of {p.name}; set data.format "
            f"({', '.join(sorted(set(_SUFFIX_FORMAT.values())))})"
        )
    return fmt


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """datasets, with its progress bars and logging off for the block."""
    import datasets

    with quiet("datasets", stderr=True, progress_bars=True):
        yield datasets


def _data_lines(p: Path, enough: int = 2) -> int:
    """Non-empty lines, counting no further than `enough` (files can be large)."""
    n = 0
    with open(p, "rb") as f:
        for line in f:
            n += bool(line.strip())
            if n >= enough:
                break
    return n


def _load_raw(spec: DataSpec) -> tuple[Any, Any | None, str]:
    """(train, eval or None, content fingerprint)."""
    p = Path(spec.path)
    with _quiet_datasets() as datasets:
        if p.exists():
            if not p.is_file():
                raise RecipeError(f"data.path: {p} is a folder; point at a data file")
            fmt = _format_of(spec, p)
            if fmt in ("csv", "json", "text") and _data_lines(p) <= (fmt == "csv"):
                raise RecipeError(f"data.path: {p.name} has no usable rows")
            kwargs: dict[str, Any] = {}
            if fmt == "csv":
                kwargs["delimiter"] = spec.delimiter or ("\t" if p.suffix == ".tsv" else ",")
            try:
                ds = datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)
            except Exception as e:  # the loaders raise many types; the user needs one line
                raise RecipeError(f"data.path: cannot read {p.name} as {fmt}: "
                                  f"{first_line(e, 200)}") from None
            return ds, None, files_hash([p], p.parent)
        if spec.path.startswith((".", "/", "~")) or p.suffix.lower() in _SUFFIX_FORMAT:
            raise RecipeError(f"data.path: {spec.path}: no such file")
        try:
            train = datasets.load_dataset(spec.path, split=spec.train_split)
            ev = (datasets.load_dataset(spec.path, split=spec.eval_split)
                  if spec.eval_split else None)
        except Exception as e:
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get(
                "HF_HUB_OFFLINE") == "1"
            why = "offline mode is on and it is not cached" if offline else first_line(e)
            raise RecipeError(f"data.path: hub dataset {spec.path!r} cannot be loaded: {why}") \
                from None
        return train, ev, canonical_hash("hub", spec.path)


def _check_columns(ds: Any, spec: DataSpec, lm: bool = False) -> None:
    if not lm and spec.label_column in (spec.text_column, spec.text_pair_column):
        raise RecipeError(f"data.label_column: {spec.label_column!r} is also a text column; "
                          "the label must be a column of its own")
    cols = list(ds.column_names)
    keys = ("text_column", "label_column", "text_pair_column")
    if lm:
        keys = ("prompt_column", "response_column") if spec.prompt_column else ("text_column",)
    for key in keys:
        name = getattr(spec, key)
        if name is not None and name not in cols:
            raise RecipeError(f"data.{key}: column {name!r} not in the data "
                              f"(columns: {', '.join(cols)})")


def _empty(v: Any) -> bool:
    """A missing value as the loaders give it: None, NaN, or blank text."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or \
        (isinstance(v, str) and not v.strip())


def _why_dropped(r: dict[str, Any]) -> str | None:
    if _empty(r["text"]):
        return "empty text"
    if "label" in r and _empty(r["label"]):
        return "empty label"
    return None


def _normalise(ds: Any, spec: DataSpec, lm: bool = False) -> tuple[Any, dict[str, Any]]:
    """The split with our column names and without unusable rows, and its accounting."""
    read = len(ds)
    if lm and spec.prompt_column:
        return _normalise_pairs(ds, spec)
    if lm:
        ds = ds.select_columns([spec.text_column])
        if spec.text_column != "text":
            ds = ds.rename_column(spec.text_column, "text")
        ds = ds.filter(lambda r: not _empty(r["text"]))
        return ds, {"read": read, "kept": len(ds), "dropped": {"blank lines": read - len(ds)}}
    keep = {spec.text_column: "text", spec.label_column: "label"}
    if spec.text_pair_column:
        keep[spec.text_pair_column] = "text_pair"
    ds = ds.select_columns(list(keep))
    for old, new in keep.items():
        if old != new:
            if new in ds.column_names:
                ds = ds.remove_columns(new)
            ds = ds.rename_column(old, new)
    reasons = [_why_dropped(r) for r in ds.select_columns(["text", "label"])]
    dropped = {why: reasons.count(why) for why in ("empty text", "empty label")}
    ds = ds.filter(lambda _r, i: reasons[i] is None, with_indices=True)
    return ds, {"read": read, "kept": len(ds), "dropped": dropped}


def _normalise_pairs(ds: Any, spec: DataSpec) -> tuple[Any, dict[str, Any]]:
    """Prompt/response rows: the template applied to each prompt (it needs no tokenizer; the
    chat template, which does, is applied when encoding), rows with an empty side dropped."""
    assert spec.prompt_column and spec.response_column
    read = len(ds)
    ds = ds.select_columns(list(dict.fromkeys([spec.prompt_column, spec.response_column])))
    rows = ds.to_dict()
    prompts, responses = rows[spec.prompt_column], rows[spec.response_column]
    why = ["empty prompt" if _empty(p) else "empty response" if _empty(r) else None
           for p, r in zip(prompts, responses, strict=True)]
    keep = [i for i, w in enumerate(why) if w is None]
    asked = [apply_template(spec.template, str(prompts[i])) for i in keep]
    out = pair_rows(asked, [str(responses[i]).strip() for i in keep],
                    [spec.chat_template] * len(keep))
    dropped = {w: why.count(w) for w in ("empty prompt", "empty response")}
    return out, {"read": read, "kept": len(out), "dropped": dropped}


def pair_rows(prompts: list[str], responses: list[str], chats: list[bool]) -> Any:
    """Prompt/response rows; `text` repeats the prompt, so whatever reads an eval text (the
    latency batch) gets what a user would send."""
    import datasets

    return datasets.Dataset.from_dict({PROMPT: prompts, RESPONSE: responses, CHAT: chats,
                                       "text": prompts})


def apply_template(template: str, prompt: str) -> str:
    """The prompt as the model is asked it: `{prompt}` in the template replaced (str.replace,
    not str.format: prompts may contain braces)."""
    return template.replace("{prompt}", prompt.strip())


def _labels(train: Any, ev: Any, num_labels: int | None) -> tuple[Any, Any, int, tuple | None]:
    values = list(train["label"]) + list(ev["label"] if ev is not None else [])
    names: tuple[str, ...] | None = None
    if all(isinstance(v, str) for v in values):
        names = tuple(sorted(set(values)))
        index = {n: i for i, n in enumerate(names)}
        train = train.map(lambda r: {"label": index[r["label"]]})
        if ev is not None:
            ev = ev.map(lambda r: {"label": index[r["label"]]})
        found = len(names)
    elif all(isinstance(v, (int, bool)) or (isinstance(v, float) and v.is_integer())
             for v in values):
        ints = [int(v) for v in values]
        if min(ints) < 0:
            raise RecipeError(f"data.label_column: label {min(ints)} is negative; labels are "
                              "class ids 0..N-1 or class names")
        found = max(ints) + 1
        if any(isinstance(v, float) for v in values):  # a column with gaps loads as floats
            train = train.map(lambda r: {"label": int(r["label"])})
            if ev is not None:
                ev = ev.map(lambda r: {"label": int(r["label"])})
    else:
        bad = next(v for v in values if not isinstance(v, (int, bool, str)))
        raise RecipeError(f"data.label_column: label {bad!r} is neither a class id nor a name")
    n = num_labels or max(found, 2)
    if found > n:
        raise RecipeError(f"data.label_column: label {found - 1} out of range for "
                          f"model.num_labels={n}")
    return train, ev, n, names


@functools.lru_cache(maxsize=4)
def load_task_data(spec: DataSpec, num_labels: int | None = None,
                   task: str = "sequence-classification") -> TaskData:
    """Load, check and split the recipe's data (memoised: every stage sees the same splits).

    For a causal LM the eval split is the tail of the text (contiguous, not shuffled in): a
    random split of lines would put each eval line's neighbours in training.
    """
    with _quiet_datasets():  # filter/map/split progress bars are noise on a CLI
        return _load_task_data(spec, num_labels, task)


def _load_task_data(spec: DataSpec, num_labels: int | None, task: str) -> TaskData:
    lm = task == "causal-lm"
    train, ev, content = _load_raw(spec)
    _check_columns(train, spec, lm)
    if ev is not None:
        _check_columns(ev, spec, lm)
    train, accounting = _normalise(train, spec, lm)
    accounts = {spec.train_split: accounting}
    if ev is not None:
        ev, accounts[spec.eval_split or "eval"] = _normalise(ev, spec, lm)
    pairs = lm and spec.prompt_column is not None
    if len(train) == 0:
        why = ", ".join(f"{k}: {v}" for k, v in accounting["dropped"].items() if v)
        raise RecipeError(f"data.path: {Path(spec.path).name} has no usable rows "
                          f"({accounting['read']} read" + (f"; dropped: {why})" if why else ")"))
    if lm:
        n, names = 0, None
    else:
        train, ev, n, names = _labels(train, ev, num_labels)
    if ev is None:
        if len(train) < 4:
            raise RecipeError(f"data: {len(train)} rows are too few to split off an eval set")
        if lm and not pairs:  # the tail: blocks are cut from consecutive rows
            cut = len(train) - max(1, round(len(train) * spec.eval_fraction))
            train, ev = train.select(range(cut)), train.select(range(cut, len(train)))
        else:
            parts = train.train_test_split(test_size=spec.eval_fraction, seed=spec.seed)
            train, ev = parts["train"], parts["test"]
    elif not lm or pairs:
        train = train.shuffle(seed=spec.seed)
    if len(ev) == 0:
        raise RecipeError("data: the eval split is empty")
    if spec.max_train_samples:
        train = train.select(range(min(spec.max_train_samples, len(train))))
    if spec.max_eval_samples:
        ev = ev.select(range(min(spec.max_eval_samples, len(ev))))
    fp = canonical_hash(content, _fingerprint_fields(spec), n,
                        *(("lm", "bos-blocks") if lm else ()))
    return TaskData(train=train, eval=ev, num_labels=n, label_names=names, fingerprint=fp,
                    spec=spec, accounting=accounts)


# Fields added to DataSpec after recipes existed: left out of the fingerprint while unset, so the
# ids of recipes that do not use them stay as they were.
_LATER_FIELDS = {"prompt_column": None, "response_column": None, "template": "{prompt}",
                 "chat_template": True}


def _fingerprint_fields(spec: DataSpec) -> dict[str, Any]:
    d = spec.model_dump(exclude={"path"})
    return {k: v for k, v in d.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


def encode(ds: Any, tokenizer: Any, max_length: int) -> Any:
    """Tokenize without padding (batches pad to their longest: much faster on short texts).

    Rows without a label are language-model text: prompt/response pairs (`encode_pairs`) or
    plain text cut into blocks (`encode_lm`).
    """
    if PROMPT in ds.column_names:
        return encode_pairs(ds, tokenizer, max_length)
    if "label" not in ds.column_names:
        return encode_lm(ds, tokenizer, max_length)
    has_pair = "text_pair" in ds.column_names

    def tok(batch: dict[str, list]) -> dict[str, Any]:
        pair = batch["text_pair"] if has_pair else None
        out = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    with _quiet_datasets():
        return ds.map(tok, batched=True, remove_columns=ds.column_names)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer puts one before a text, else []: a model trained that way
    (Gemma) scores text without it as if it were noise (perplexity ~5,000 instead of ~235)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def encode_lm(ds: Any, tokenizer: Any, block: int) -> Any:
    """Causal-LM text: tokenize, join the rows with a newline (eos if the tokenizer has no
    newline token), cut into full blocks of `block` tokens (each starting with BOS when the
    tokenizer adds one); labels are the inputs.

    A remainder shorter than a block is dropped, except that text shorter than one block makes
    one short block, so a tiny eval split still yields something to score.
    """
    ids: list[int] = []
    sep = tokenizer("\n", add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    for text in ds["text"]:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    bos = bos_prefix(tokenizer)
    size = block - len(bos)
    n = max(1, len(ids) // size)
    blocks = [bos + ids[i * size:(i + 1) * size] for i in range(n)]
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
        "labels": [list(b) for b in blocks]})


def render_pair(tokenizer: Any, prompt: str, response: str | None, chat: bool
                ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as the model reads and writes them; the one rendering that
    training, evaluation and teacher generation share.

    With the tokenizer's chat template (when `chat` and it has one): the prompt is the user turn
    plus the generation prompt, the response is what the template writes after it (the answer
    and its end-of-turn tokens). Without: the prompt as is (BOS when the tokenizer adds one), a
    space, the response, EOS. `response=None` gives the prompt alone.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        if response is None:
            return p_ids, []
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False)
        tail = full[len(head):] if full.startswith(head) else \
            response + (tokenizer.eos_token or "")
        return p_ids, tokenizer(tail, add_special_tokens=False)["input_ids"]
    p_ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if response is None:
        return p_ids, []
    sep = "" if prompt[-1:].isspace() else " "
    r_ids = tokenizer(sep + response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return p_ids, r_ids + eos


def fit_pair(p_ids: list[int], r_ids: list[int], max_length: int, keep_first: bool
             ) -> tuple[list[int], list[int]]:
    """Cut a pair to max_length: the response keeps its start, the prompt its end (the
    question sits there) and, with `keep_first`, its first token (BOS)."""
    r_ids = r_ids[:max(1, max_length - 1)]
    room = max_length - len(r_ids)
    if len(p_ids) > room:
        p_ids = p_ids[:1] + p_ids[len(p_ids) - room + 1:] if keep_first and room > 1 \
            else p_ids[len(p_ids) - room:]
    return p_ids, r_ids


def encode_pairs(ds: Any, tokenizer: Any, max_length: int) -> Any:
    """Prompt/response rows as one sequence each; labels -100 on the prompt, so the loss and
    distillation see the response tokens only."""
    import datasets

    keep_first = bool(bos_prefix(tokenizer))
    ids, labels = [], []
    for p, r, chat in zip(ds[PROMPT], ds[RESPONSE], ds[CHAT], strict=True):
        p_ids, r_ids = fit_pair(*render_pair(tokenizer, p, r, chat), max_length, keep_first)
        ids.append(p_ids + r_ids)
        labels.append([-100] * len(p_ids) + r_ids)
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x)
                                                                           for x in ids],
                                       "labels": labels})


def calibration_batches(data: TaskData, tokenizer: Any, n: int, batch_size: int = 8
                        ) -> list[dict[str, Any]]:
    """Up to `n` training examples (blocks, for an LM) as model-ready tensor batches, labels
    included (Taylor importance needs a loss). The same rows every call."""
    rows = data.train if data.causal_lm and not data.instruct else \
        data.train.select(range(min(n, len(data.train))))
    enc = encode(rows, tokenizer, data.spec.max_length)
    enc = enc.select(range(min(n, len(enc))))
    return list(loader(enc, tokenizer, batch_size))


def loader(encoded: Any, tokenizer: Any, batch_size: int, *, shuffle: bool = False,
           seed: int = 0, tensors: str = "pt", static_shapes: bool = False) -> Any:
    """A DataLoader over encoded rows, padding each batch to its longest row (token labels,
    as prompt/response rows have, padded with -100).

    `static_shapes` (for torch.compile): lengths padded to a multiple of 64 and the last short
    batch dropped, so a compiled model sees a few shapes; every new one recompiles (on an H100
    a ragged last batch cost ~90 s of a 150 s run). The caller decides it, knowing the rows
    make at least one full batch (compress.train counts its epochs from the same decision)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    ragged = "labels" in encoded.column_names and len(encoded) and \
        isinstance(encoded[0]["labels"], list)
    multiple = 64 if static_shapes else None
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors=tensors,
                                     pad_to_multiple_of=multiple) \
        if ragged else DataCollatorWithPadding(tokenizer, return_tensors=tensors,
                                               pad_to_multiple_of=multiple)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=collate, generator=gen,
                                       drop_last=static_shapes)
