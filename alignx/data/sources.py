"""Stage 1 (prepare): read each raw data source into :class:`~alignx.data.schema.Example` lists.

One reader per source, chosen per axis by ``cfg.data.sources`` and dispatched by
:func:`read_source`:

=============  ==============  ====================================================
source         axis            local files under ``<data_dir>/``
=============  ==============  ====================================================
alpaca         helpfulness     ``alpaca/<split>.jsonl`` | ``alpaca/<split>.json`` (array)
                               | upstream ``alpaca/alpaca_data.json`` (split by hashing)
beavertails    harmlessness    ``beavertails/<split>.jsonl`` | ``beavertails/<split>.parquet``
hh_rlhf        harmlessness    ``hh_rlhf_harmless/<split>.jsonl``
truthfulqa     honesty         ``truthfulqa/<split>.jsonl`` | ``truthfulqa/<split>.csv``
                               | upstream ``truthfulqa/TruthfulQA.csv`` (split by hashing)
=============  ==============  ====================================================

With ``from_hub=True`` the same rows come from the Hugging Face Hub (``tatsu-lab/alpaca``,
``PKU-Alignment/BeaverTails``, ``Anthropic/hh-rlhf`` harmless-base, ``truthful_qa``). The
Hub and local paths share the row-mapping functions ``map_*_row`` (and the deterministic
hash splits of :func:`hash_split` / :func:`stratified_hash_split`, which reproduce the
``alignx-data-v1`` splits of the shared data folder when ``seed == 0``).

Malformed input stops with a :class:`DataFormatError` naming the file, the line (or row)
and the field. Rows are dropped only by the documented quality filters below, and every
drop is counted in a log line; if the filters drop more than half of a file, that is
treated as a wrong file and raised.

Filters (all counted and logged):

* alpaca: outputs that are empty or a "no output" placeholder (``<nooutput>``, ...);
  "no input" placeholders in ``input`` (``<noinput>``, ``No input.``, ...) become empty.
* hh_rlhf: a ``chosen`` reply is only the *less harmful* of two, not a vetted safe answer.
  Empty final replies are dropped, and so are dialogues whose turns before the final reply
  end with an Assistant turn (two Assistant turns in a row, a handful of rows upstream),
  since an example must end with a user turn. Consecutive same-role turns inside the
  prompt are merged.
* beavertails: only ``is_safe == True`` responses are kept as targets (``safe_only``), in
  every split; read with ``safe_only=False`` for all prompts (e.g. safety evaluation).
* truthfulqa: none. The target is ``Best Answer`` (some are "I have no comment": kept);
  ``all_correct=True`` adds one extra row per other correct answer (off by default).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alignx import envs
from alignx.axes import AXIS_SPECS, Axis
from alignx.config import AlignXConfigError
from alignx.data.schema import Example, Message

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("alpaca", "beavertails", "hh_rlhf", "truthfulqa")

#: Folder of each source under the data directory.
SOURCE_DIRS: dict[str, str] = {
    "alpaca": "alpaca",
    "beavertails": "beavertails",
    "hh_rlhf": "hh_rlhf_harmless",
    "truthfulqa": "truthfulqa",
}

HUB_ALPACA = "tatsu-lab/alpaca"
HUB_BEAVERTAILS = "PKU-Alignment/BeaverTails"
HUB_HH = "Anthropic/hh-rlhf"
HUB_HH_DATA_DIR = "harmless-base"
HUB_TRUTHFULQA = "truthful_qa"

#: Prefix of every split hash key; equals the shared data folder's seed string for seed 0.
SPLIT_SEED = "alignx-data-v1"

HUB_SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Above this share of quality-filtered rows a file is taken to be the wrong file.
MAX_FILTERED_FRACTION = 0.5

_TQA_COLUMNS = (
    "Type",
    "Category",
    "Question",
    "Best Answer",
    "Correct Answers",
    "Incorrect Answers",
)
_NO_INPUT = re.compile(r"^[\W_]*no\s*input[\W_]*$", re.IGNORECASE)
_NO_OUTPUT = re.compile(r"^[\W_]*no\s*output(\s+required)?[\W_]*$", re.IGNORECASE)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_NO_COMMENT = "i have no comment"

T = TypeVar("T")


# ----------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Loc:
    """Where a raw record came from, for error messages.

    Attributes:
        file: a path, or ``hub:<id>[<split>]``.
        line: 1-based line of the record's start (text formats), if known.
        row: 1-based record number (Parquet, Hub and JSON arrays), if known.
    """

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        return ", ".join(parts)


class DataFormatError(ValueError):
    """Malformed raw data; the message names the file, the line (or row) and the field.

    Attributes:
        loc: where the bad record is.
        field: the offending field, or ``None`` for file-level problems.
    """

    def __init__(self, loc: Loc | str, field: str | None, problem: str):
        self.loc = loc if isinstance(loc, Loc) else Loc(str(loc))
        self.field = field
        where = str(self.loc)
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}: {what}{problem}")


class SourceNotFoundError(DataFormatError, FileNotFoundError):
    """The data directory or a split's file is missing (lists the paths tried)."""


class SkipRow(Exception):
    """Raised by a ``map_*_row`` function for a row a documented filter drops.

    Attributes:
        reason: short reason, used as the counter key in the log line.
        quality: ``True`` for quality filters (count toward :data:`MAX_FILTERED_FRACTION`),
            ``False`` for deliberate selections (BeaverTails ``is_safe``).
    """

    def __init__(self, reason: str, quality: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.quality = quality


# ----------------------------------------------------------------------------- field access


def _field(row: dict[str, Any], key: str, loc: Loc) -> Any:
    if key not in row:
        have = ", ".join(sorted(map(str, row))) or "none"
        raise DataFormatError(loc, key, f"missing (fields present: {have})")
    return row[key]


def _str(row: dict[str, Any], key: str, loc: Loc, nonempty: bool = False) -> str:
    v = _field(row, key, loc)
    if not isinstance(v, str):
        raise DataFormatError(loc, key, f"expected a string, got {type(v).__name__}: {v!r:.60}")
    if nonempty and not v.strip():
        raise DataFormatError(loc, key, "is empty")
    return v


def _opt_str(row: dict[str, Any], key: str, loc: Loc) -> str | None:
    if row.get(key) is None:
        return None
    return _str(row, key, loc)


def _bool(row: dict[str, Any], key: str, loc: Loc) -> bool:
    v = _field(row, key, loc)
    if not isinstance(v, bool):
        raise DataFormatError(loc, key, f"expected true/false, got {type(v).__name__}: {v!r:.60}")
    return v


def _str_list(row: dict[str, Any], key: str, loc: Loc) -> list[str]:
    v = _field(row, key, loc)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataFormatError(loc, key, f"expected a list of strings, got {v!r:.80}")
    return list(v)


def _targets(row: dict[str, Any], key: str, loc: Loc) -> dict[str, int] | None:
    v = row.get(key)
    if v is None:
        return None
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, int) and x in (0, 1) for k, x in v.items()
    ):
        raise DataFormatError(loc, key, f"expected an object answer -> 0/1, got {v!r:.80}")
    return {k: int(x) for k, x in v.items()}


def _idx(row: dict[str, Any], loc: Loc) -> int | None:
    v = row.get("idx")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataFormatError(loc, "idx", f"expected an integer, got {v!r:.40}")
    return v


def _uid(source: str, idx: int | None, split: str, pos: int) -> str:
    """``<source>:<idx>`` if the row has its upstream index, else ``<source>:<split>:<pos>``."""
    return f"{source}:{idx}" if idx is not None else f"{source}:{split}:{pos}"


# ----------------------------------------------------------------------------- file readers


def iter_jsonl(path: Path) -> Iterator[tuple[dict[str, Any], Loc]]:
    """Yield ``(record, loc)`` for each non-blank line of a JSON Lines file.

    Raises:
        DataFormatError: a line that is not JSON or not an object, or no records at all.
    """
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            loc = Loc(str(path), line=lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    loc, None, f"not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise DataFormatError(
                    loc, None, f"expected a JSON object, got {type(obj).__name__}"
                )
            n += 1
            yield obj, loc
    if n == 0:
        raise DataFormatError(Loc(str(path)), None, "empty file (no records)")


def iter_json_array(path: Path) -> Iterator[tuple[dict[str, Any], Loc]]:
    """Yield ``(record, loc)`` for each object of a JSON file holding one array of objects.

    Line numbers are tracked while decoding element by element.

    Raises:
        DataFormatError: not an array, invalid JSON, a non-object element, or an empty array.
    """
    text = path.read_text("utf-8")
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()  # type: ignore[union-attr]
    if pos >= len(text):
        raise DataFormatError(Loc(str(path)), None, "empty file (no records)")
    if text[pos] != "[":
        raise DataFormatError(
            Loc(str(path), line=text.count("\n", 0, pos) + 1),
            None,
            "expected a JSON array of objects (or use .jsonl)",
        )
    pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    line, counted = 1, 0
    n = 0
    if pos < len(text) and text[pos] == "]":
        raise DataFormatError(Loc(str(path)), None, "empty file (the array has no records)")
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        loc = Loc(str(path), line=line, row=n + 1)
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                loc, None, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise DataFormatError(loc, None, f"expected a JSON object, got {type(obj).__name__}")
        n += 1
        yield obj, loc
        pos = ws.match(text, end).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataFormatError(
            Loc(str(path), line=line + text.count("\n", counted, pos)),
            None,
            "not valid JSON (expected ',' or ']' after a record)",
        )


def iter_csv(path: Path, required: Iterable[str]) -> Iterator[tuple[dict[str, Any], Loc]]:
    """Yield ``(record, loc)`` for each row of a CSV file with a header line.

    Raises:
        DataFormatError: a missing required column, a row with the wrong number of cells,
            or no rows.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise DataFormatError(Loc(str(path)), None, "empty file (no header line)")
        for col in required:
            if col not in header:
                raise DataFormatError(
                    Loc(str(path), line=1), col, f"missing column (header: {', '.join(header)})"
                )
        n = 0
        start = reader.line_num + 1
        for row in reader:
            loc = Loc(str(path), line=start)
            if None in row:
                raise DataFormatError(
                    loc, None, f"more cells than the {len(header)} header columns"
                )
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise DataFormatError(loc, missing[0], "missing cell (fewer cells than the header)")
            n += 1
            yield dict(row), loc
            start = reader.line_num + 1
    if n == 0:
        raise DataFormatError(Loc(str(path)), None, "empty file (header but no rows)")


def iter_parquet(path: Path) -> Iterator[tuple[dict[str, Any], Loc]]:
    """Yield ``(record, loc)`` for each row of a Parquet file.

    Raises:
        DataFormatError: unreadable file or no rows.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataFormatError(Loc(str(path)), None, f"not a readable Parquet file ({e})") from None
    if table.num_rows == 0:
        raise DataFormatError(Loc(str(path)), None, "empty file (no rows)")
    for i, row in enumerate(table.to_pylist(), 1):
        yield row, Loc(str(path), row=i)


def _iter_file(path: Path, csv_columns: Iterable[str] = ()) -> Iterator[tuple[dict[str, Any], Loc]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path)
    if suffix == ".json":
        return iter_json_array(path)
    if suffix == ".csv":
        return iter_csv(path, csv_columns)
    if suffix == ".parquet":
        return iter_parquet(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}")


# ----------------------------------------------------------------------------- data dir + files


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The local data directory: ``data_dir``, else ``$ALIGNX_DATA_DIR``.

    Raises:
        AlignXConfigError: neither is set (names ``data.data_dir`` and ``ALIGNX_DATA_DIR``).
        SourceNotFoundError: the directory does not exist.
    """
    d = Path(data_dir).expanduser() if data_dir is not None else envs.data_dir()
    if d is None:
        raise AlignXConfigError(
            "no data directory: set data.data_dir in the config (or override "
            "data.data_dir=PATH), or the ALIGNX_DATA_DIR environment variable, "
            "or use data.from_hub=true on a machine with internet"
        )
    if not d.is_dir():
        raise SourceNotFoundError(
            Loc(str(d)), None, "data directory does not exist (data.data_dir / ALIGNX_DATA_DIR)"
        )
    return d


#: Local candidates per source, in order of preference: (file name pattern, is upstream whole file).
_CANDIDATES: dict[str, tuple[tuple[str, bool], ...]] = {
    "alpaca": (("{split}.jsonl", False), ("{split}.json", False), ("alpaca_data.json", True)),
    "beavertails": (("{split}.jsonl", False), ("{split}.parquet", False)),
    "hh_rlhf": (("{split}.jsonl", False),),
    "truthfulqa": (("{split}.jsonl", False), ("{split}.csv", False), ("TruthfulQA.csv", True)),
}


def find_source_file(name: str, split: str, data_dir: str | Path | None) -> tuple[Path, bool]:
    """Locate the local file for ``name``/``split``.

    Args:
        name: a source name.
        split: a split name (``train``, ``validation``, ``test``, or any file stem present).
        data_dir: the data directory (``None``: ``$ALIGNX_DATA_DIR``).

    Returns:
        ``(path, whole)``; ``whole`` means an upstream single file that is split by hashing.

    Raises:
        ValueError: unknown source.
        AlignXConfigError: no data directory configured.
        SourceNotFoundError: no candidate file exists (lists the paths tried).
    """
    _check_source(name)
    folder = resolve_data_dir(data_dir) / SOURCE_DIRS[name]
    tried = []
    for pattern, whole in _CANDIDATES[name]:
        if whole and split not in HUB_SPLITS:
            continue
        p = folder / pattern.format(split=split)
        if p.is_file():
            return p, whole
        tried.append(str(p))
    raise SourceNotFoundError(
        Loc(str(folder)), None, f"no {name} data for split {split!r}; tried: {', '.join(tried)}"
    )


def source_location(name: str, split: str, data_dir: str | Path | None, from_hub: bool) -> str:
    """Where ``read_source`` reads ``name``/``split`` from (for manifests).

    Returns:
        A local path, or ``hub:<id>[<config>]`` for the Hub.
    """
    if from_hub:
        return {
            "alpaca": f"hub:{HUB_ALPACA}",
            "beavertails": f"hub:{HUB_BEAVERTAILS}[30k_train,30k_test]",
            "hh_rlhf": f"hub:{HUB_HH}[{HUB_HH_DATA_DIR}]",
            "truthfulqa": f"hub:{HUB_TRUTHFULQA}[generation,multiple_choice]",
        }[name]
    return str(find_source_file(name, split, data_dir)[0])


# ----------------------------------------------------------------------------- hash splits


def _prefix(seed: int) -> str:
    return SPLIT_SEED if seed == 0 else f"{SPLIT_SEED}-seed{seed}"


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hash_split(
    items: list[T], key: Callable[[T], str], n_test: int, n_validation: int
) -> dict[str, list[T]]:
    """Deterministic split by hash rank: the lowest ``n_test`` keys are test, the next
    ``n_validation`` validation, the rest train. Items sharing a key stay together.

    Args:
        items: the records, in upstream order (kept within each split).
        key: the hash key of a record (already salted with the seed prefix).
        n_test: number of distinct keys for test.
        n_validation: number of distinct keys for validation.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``.
    """
    keys = sorted({key(x) for x in items}, key=_rank)
    which = {k: "test" for k in keys[:n_test]}
    which.update({k: "validation" for k in keys[n_test : n_test + n_validation]})
    out: dict[str, list[T]] = {s: [] for s in HUB_SPLITS}
    for x in items:
        out[which.get(key(x), "train")].append(x)
    return out


def stratified_hash_split(
    items: list[T],
    key: Callable[[T], str],
    group: Callable[[T], str],
    test_frac: float,
    validation_frac: float,
) -> dict[str, list[T]]:
    """:func:`hash_split` inside each group, with ``frac * group size`` (rounded half up)
    per split.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, upstream order kept.
    """
    groups: dict[str, list[T]] = defaultdict(list)
    for x in items:
        groups[group(x)].append(x)
    which: dict[int, str] = {}
    for members in groups.values():
        n = len(members)
        parts = hash_split(
            members, key, _round_half_up(test_frac * n), _round_half_up(validation_frac * n)
        )
        for split, xs in parts.items():
            which.update({id(x): split for x in xs})
    out: dict[str, list[T]] = {s: [] for s in HUB_SPLITS}
    for x in items:
        out[which[id(x)]].append(x)
    return out


def _round_half_up(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even); the shared data folder's rule."""
    return math.floor(x + 0.5)


def _eval_size(n: int, cap: int, frac: float) -> int:
    return min(cap, max(1, _round_half_up(frac * n))) if n >= 3 else 0


def split_alpaca(rows: list[tuple[dict[str, Any], Loc, int]], seed: int) -> dict[str, list]:
    """Split whole Alpaca (``(row, loc, idx)``) as the shared data folder does:
    rank by ``sha256("<prefix>:alpaca:<idx>")``; 1,000 test, 1,000 validation (10% each for
    small inputs), the rest train.
    """
    n_eval = _eval_size(len(rows), 1000, 0.1)
    p = _prefix(seed)
    return hash_split(rows, lambda r: f"{p}:alpaca:{r[2]}", n_eval, n_eval)


def split_truthfulqa(rows: list[tuple[dict[str, Any], Loc, int]], seed: int) -> dict[str, list]:
    """Split whole TruthfulQA (``(local-shaped row, loc, idx)``) as the shared data folder
    does: within each ``Category``, rank by ``sha256("<prefix>:truthfulqa:<idx>")``; the
    first ``0.4 n`` test, the next ``0.1 n`` validation (rounded half up), the rest train.
    """
    p = _prefix(seed)
    return stratified_hash_split(
        rows, lambda r: f"{p}:truthfulqa:{r[2]}", lambda r: str(r[0].get("Category")), 0.4, 0.1
    )


def _split_by_prompt(rows: list, prompt: Callable[[Any], str], tag: str, seed: int) -> dict:
    """Carve validation (5% of distinct prompts) out of an upstream train split."""
    p = _prefix(seed)
    n_prompts = len({prompt(r) for r in rows})
    parts = hash_split(
        rows, lambda r: f"{p}:{tag}:{prompt(r)}", 0, _eval_size(n_prompts, 10**9, 0.05)
    )
    return parts


# ----------------------------------------------------------------------------- row mapping


def _clean_alpaca_input(text: str) -> str:
    return "" if _NO_INPUT.match(text.strip()) else text.strip()


def map_alpaca_row(row: dict[str, Any], uid: str, axis: Axis, loc: Loc) -> Example:
    """Map an Alpaca record (local file or ``tatsu-lab/alpaca`` Hub row) to an Example.

    Fields: ``instruction`` (non-empty str), ``input`` (str, may be empty), ``output`` (str);
    ``idx`` optional. The user message is the instruction, then a blank line and the input
    when there is one.

    Raises:
        DataFormatError: missing field or wrong type.
        SkipRow: empty or placeholder output (``<nooutput>``).
    """
    instruction = _str(row, "instruction", loc, nonempty=True).strip()
    inp = _clean_alpaca_input(_str(row, "input", loc))
    output = _str(row, "output", loc)
    if not output.strip() or _NO_OUTPUT.match(output.strip()):
        raise SkipRow("empty or placeholder output")
    prompt = f"{instruction}\n\n{inp}" if inp else instruction
    return Example(
        axis=axis,
        messages=({"role": "user", "content": prompt},),
        response=output.strip(),
        source="alpaca",
        uid=uid,
        meta={"idx": _idx(row, loc), "instruction": instruction, "input": inp},
    )


def map_beavertails_row(
    row: dict[str, Any], uid: str, axis: Axis, loc: Loc, safe_only: bool = True
) -> Example:
    """Map a BeaverTails record (``prompt/response/category/is_safe``, local or Hub).

    Raises:
        DataFormatError: missing field or wrong type (``category`` must map names to bools).
        SkipRow: an unsafe response when ``safe_only`` (a selection, not a quality filter).
    """
    prompt = _str(row, "prompt", loc, nonempty=True)
    response = _str(row, "response", loc)
    is_safe = _bool(row, "is_safe", loc)
    category = _field(row, "category", loc)
    if not isinstance(category, dict) or not all(
        isinstance(k, str) and isinstance(v, (bool, type(None))) for k, v in category.items()
    ):
        raise DataFormatError(
            loc, "category", f"expected an object of name -> bool, got {category!r:.80}"
        )
    if safe_only and not is_safe:
        raise SkipRow("unsafe response (is_safe=false)", quality=False)
    if not response.strip():
        raise SkipRow("empty response")
    return Example(
        axis=axis,
        messages=({"role": "user", "content": prompt.strip()},),
        response=response.strip(),
        source="beavertails",
        uid=uid,
        meta={"is_safe": is_safe, "categories": sorted(k for k, v in category.items() if v)},
    )


def parse_hh_dialogue(text: str) -> list[Message]:
    """Parse an HH-RLHF ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript into turns.

    Turns are returned as they appear (consecutive same-role turns are *not* merged here);
    contents are stripped.

    Args:
        text: the transcript.

    Returns:
        The turns, ``user`` for Human and ``assistant`` for Assistant.

    Raises:
        ValueError: the text does not start with a Human turn or has no Assistant turn.
    """
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a transcript starting with '\\n\\nHuman:'")
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[0]["role"] != "user":
        raise ValueError("the transcript must start with a Human turn")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the transcript must end with an Assistant reply")
    return turns


def _merge_turns(turns: list[Message]) -> list[Message]:
    out: list[Message] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"]:
            out[-1] = {"role": t["role"], "content": f"{out[-1]['content']}\n\n{t['content']}"}
        else:
            out.append(dict(t))
    return out


def map_hh_row(row: dict[str, Any], uid: str, axis: Axis, loc: Loc) -> Example:
    """Map an HH-RLHF harmless pair (local file or ``Anthropic/hh-rlhf`` Hub row).

    The prompt is the ``chosen`` transcript up to its last Assistant marker, the response is
    the final ``chosen`` reply; the final ``rejected`` reply goes to ``meta``. When the row
    also carries ``chosen_response`` (the shared data folder adds it), it must agree.

    Raises:
        DataFormatError: missing field, wrong type, or a transcript that cannot be parsed.
        SkipRow: an empty final reply, or a prompt that ends with an Assistant turn.
    """
    chosen = _str(row, "chosen", loc, nonempty=True)
    rejected = _str(row, "rejected", loc)
    try:
        turns = parse_hh_dialogue(chosen)
    except ValueError as e:
        raise DataFormatError(loc, "chosen", str(e)) from None
    try:
        rejected_turns = parse_hh_dialogue(rejected)
    except ValueError as e:
        raise DataFormatError(loc, "rejected", str(e)) from None
    reply = turns[-1]["content"]
    given = _opt_str(row, "chosen_response", loc)
    if given is not None and given.strip() != reply:
        raise DataFormatError(loc, "chosen_response", "does not match the final reply of 'chosen'")
    if not reply:
        raise SkipRow("empty chosen reply")
    prompt = _merge_turns(turns[:-1])
    if prompt[-1]["role"] != "user":
        raise SkipRow("two Assistant turns before the final reply")
    return Example(
        axis=axis,
        messages=tuple(prompt),
        response=reply,
        source="hh_rlhf",
        uid=uid,
        meta={
            "idx": _idx(row, loc),
            "rejected_response": rejected_turns[-1]["content"],
            "same_prompt": _merge_turns(rejected_turns[:-1]) == prompt,
        },
    )


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def truthfulqa_from_hub(gen: dict[str, Any], mc: dict[str, Any] | None) -> dict[str, Any]:
    """Reshape a ``truthful_qa`` Hub row (generation config, plus the matching
    multiple_choice row) into the local ``TruthfulQA.csv``/jsonl field names.

    Args:
        gen: ``{type, category, question, best_answer, correct_answers, incorrect_answers,
            source}``.
        mc: ``{question, mc1_targets: {choices, labels}, mc2_targets: {...}}`` or ``None``.

    Returns:
        A dict with ``Type, Category, Question, Best Answer, Correct Answers, Incorrect
        Answers, Source, correct_answers, incorrect_answers`` and (with ``mc``) the MC
        targets as ``answer -> 0/1`` objects. Missing keys stay missing, so the shared
        mapper reports them.
    """
    names = {
        "type": "Type",
        "category": "Category",
        "question": "Question",
        "best_answer": "Best Answer",
        "source": "Source",
    }
    out: dict[str, Any] = {new: gen[old] for old, new in names.items() if old in gen}
    for key, col in (
        ("correct_answers", "Correct Answers"),
        ("incorrect_answers", "Incorrect Answers"),
    ):
        if key in gen:
            out[key] = list(gen[key]) if isinstance(gen[key], (list, tuple)) else gen[key]
            if isinstance(out[key], list):
                out[col] = "; ".join(map(str, out[key]))
    if mc is not None:
        for t in ("mc1_targets", "mc2_targets"):
            v = mc.get(t)
            if (
                isinstance(v, dict)
                and isinstance(v.get("choices"), (list, tuple))
                and isinstance(v.get("labels"), (list, tuple))
                and len(v["choices"]) == len(v["labels"])
            ):
                out[t] = dict(zip(v["choices"], v["labels"], strict=True))
            elif v is not None:
                out[t] = v
    return out


def map_truthfulqa_row(
    row: dict[str, Any], uid: str, axis: Axis, loc: Loc, all_correct: bool = False
) -> list[Example]:
    """Map a TruthfulQA record (CSV columns, jsonl, or :func:`truthfulqa_from_hub` output).

    The target is ``Best Answer``; reference answers and MC targets go to ``meta`` for
    evaluation.

    Args:
        row: the record.
        uid: the id of the main example.
        axis: the axis.
        loc: where the record is.
        all_correct: also emit one example per other correct answer (except "I have no
            comment"), with uids ``<uid>:alt<j>``.

    Returns:
        The main example, then any extra ones.

    Raises:
        DataFormatError: missing column/field, empty question or best answer, wrong type.
    """
    for col in _TQA_COLUMNS:
        _str(row, col, loc, nonempty=col in ("Question", "Best Answer", "Category"))
    question = row["Question"].strip()
    best = row["Best Answer"].strip()
    correct = (
        _str_list(row, "correct_answers", loc)
        if "correct_answers" in row
        else _split_answers(row["Correct Answers"])
    )
    incorrect = (
        _str_list(row, "incorrect_answers", loc)
        if "incorrect_answers" in row
        else _split_answers(row["Incorrect Answers"])
    )
    meta = {
        "idx": _idx(row, loc),
        "type": row["Type"],
        "category": row["Category"],
        "best_answer": best,
        "correct_answers": correct,
        "incorrect_answers": incorrect,
        "mc1_targets": _targets(row, "mc1_targets", loc),
        "mc2_targets": _targets(row, "mc2_targets", loc),
        "source_url": _opt_str(row, "Source", loc),
    }
    msgs: tuple[Message, ...] = ({"role": "user", "content": question},)
    out = [Example(axis, msgs, best, "truthfulqa", uid, meta)]
    if all_correct:
        seen = {best.lower().rstrip(".")}
        for j, ans in enumerate(correct):
            key = ans.strip().lower().rstrip(".")
            if key in seen or key == _NO_COMMENT:
                continue
            seen.add(key)
            out.append(
                Example(
                    axis,
                    msgs,
                    ans.strip(),
                    "truthfulqa",
                    f"{uid}:alt{j}",
                    {**meta, "alt_answer": True},
                )
            )
    return out


# ----------------------------------------------------------------------------- collection


Mapper = Callable[[dict[str, Any], str, Loc], "Example | list[Example]"]


def _collect(
    records: Iterable[tuple[dict[str, Any], Loc, str]], mapper: Mapper, what: str
) -> list[Example]:
    """Map ``(row, loc, uid)`` records, counting filtered rows; raise if most are filtered."""
    out: list[Example] = []
    dropped: Counter[str] = Counter()
    quality = 0
    total = 0
    for row, loc, uid in records:
        total += 1
        try:
            mapped = mapper(row, uid, loc)
        except SkipRow as s:
            dropped[s.reason] += 1
            quality += int(s.quality)
            continue
        out.extend(mapped if isinstance(mapped, list) else [mapped])
    if dropped:
        detail = ", ".join(f"{n} {r}" for r, n in dropped.most_common())
        log.info("%s: kept %d of %d records; dropped %s", what, len(out), total, detail)
    else:
        log.info("%s: %d records", what, len(out))
    if total and quality / total > MAX_FILTERED_FRACTION:
        raise DataFormatError(
            Loc(what),
            None,
            f"{quality} of {total} records were filtered out ({detail}); this looks like the "
            "wrong file or schema",
        )
    if not out:
        raise DataFormatError(
            Loc(what), None, f"no usable records ({detail if dropped else 'empty'})"
        )
    return out


def _with_pos(
    records: Iterable[tuple[dict[str, Any], Loc]],
) -> Iterator[tuple[dict[str, Any], Loc, int]]:
    for pos, (row, loc) in enumerate(records):
        yield row, loc, pos


def _check_source(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; valid: {', '.join(SOURCES)}")


def _log_reading(path: Path) -> None:
    size = path.stat().st_size
    if size > 4 << 20:
        log.info("reading %s (%.1f MB)", path, size / 2**20)


# ----------------------------------------------------------------------------- hub access


def _hub_load(
    path: str, name: str | None = None, split: str | None = None, data_dir: str | None = None
) -> Any:
    """``datasets.load_dataset`` with a message that says what to do offline."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise ImportError("loading from the Hub needs the `datasets` package") from e
    kwargs: dict[str, Any] = {}
    if name is not None:
        kwargs["name"] = name
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not load {path} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "without internet, put the files under data.data_dir / ALIGNX_DATA_DIR and set "
            "data.from_hub=false"
        ) from e


def _hub_rows(hub_id: str, split: str, ds: Iterable[dict[str, Any]]) -> list[tuple[dict, Loc, int]]:
    return [(dict(r), Loc(f"hub:{hub_id}[{split}]", row=i + 1), i) for i, r in enumerate(ds)]


def _check_hub_split(split: str) -> None:
    if split not in HUB_SPLITS:
        raise ValueError(f"Hub sources have splits {HUB_SPLITS}, not {split!r}")


# ----------------------------------------------------------------------------- readers


def read_alpaca(
    split: str,
    data_dir: str | Path | None = None,
    from_hub: bool = False,
    seed: int = 0,
    axis: Axis = Axis.HELPFULNESS,
) -> list[Example]:
    """Read Alpaca (instruction, input, output) for ``split``.

    Args:
        split: ``train``/``validation``/``test`` (local files may offer more, e.g.
            ``train_10k``).
        data_dir: data directory (``None``: ``$ALIGNX_DATA_DIR``).
        from_hub: read ``tatsu-lab/alpaca`` (train only upstream; split by hashing).
        seed: hash-split seed for the Hub / upstream single file (0 reproduces the shared
            data folder's splits).
        axis: the axis the examples feed.

    Returns:
        The examples, upstream order.

    Raises:
        DataFormatError: malformed input (names file, line, field).
        SourceNotFoundError: no file for the split (a ``FileNotFoundError``).
    """

    def mapper(row: dict[str, Any], uid: str, loc: Loc) -> Example:
        return map_alpaca_row(row, uid, axis, loc)

    if from_hub:
        _check_hub_split(split)
        rows = _hub_rows(HUB_ALPACA, "train", _hub_load(HUB_ALPACA, split="train"))
        part = split_alpaca(rows, seed)[split]
        return _collect(
            ((r, loc, f"alpaca:{i}") for r, loc, i in part), mapper, f"hub:{HUB_ALPACA}[{split}]"
        )
    path, whole = find_source_file("alpaca", split, data_dir)
    _log_reading(path)
    if whole:
        rows = [
            (r, loc, _idx(r, loc) if _idx(r, loc) is not None else pos)
            for r, loc, pos in _with_pos(_iter_file(path))
        ]
        part = split_alpaca(rows, seed)[split]
        return _collect(((r, loc, f"alpaca:{i}") for r, loc, i in part), mapper, f"{path}[{split}]")
    recs = (
        (r, loc, _uid("alpaca", _idx(r, loc), split, pos))
        for r, loc, pos in _with_pos(_iter_file(path))
    )
    return _collect(recs, mapper, str(path))


def read_beavertails(
    split: str,
    data_dir: str | Path | None = None,
    from_hub: bool = False,
    seed: int = 0,
    axis: Axis = Axis.HARMLESSNESS,
    safe_only: bool = True,
) -> list[Example]:
    """Read BeaverTails (``prompt/response/category/is_safe``) for ``split``.

    Args:
        split: a split name; on the Hub, ``train``/``validation`` come from ``30k_train``
            (validation = 5% of its distinct prompts by hash) and ``test`` is ``30k_test``.
        data_dir: data directory (``None``: ``$ALIGNX_DATA_DIR``).
        from_hub: read ``PKU-Alignment/BeaverTails``.
        seed: hash-split seed (Hub).
        axis: the axis the examples feed.
        safe_only: keep only ``is_safe`` responses (SFT targets must be safe).

    Returns:
        The examples.

    Raises:
        DataFormatError: malformed input.
        SourceNotFoundError: no file for the split (a ``FileNotFoundError``).
    """

    def mapper(row: dict[str, Any], uid: str, loc: Loc) -> Example:
        return map_beavertails_row(row, uid, axis, loc, safe_only=safe_only)

    if from_hub:
        _check_hub_split(split)
        up = "30k_test" if split == "test" else "30k_train"
        rows = _hub_rows(HUB_BEAVERTAILS, up, _hub_load(HUB_BEAVERTAILS, split=up))
        if split != "test":
            rows = _split_by_prompt(rows, lambda r: str(r[0].get("prompt")), "beavertails", seed)[
                split
            ]
        return _collect(
            ((r, loc, f"beavertails:{up}:{i}") for r, loc, i in rows),
            mapper,
            f"hub:{HUB_BEAVERTAILS}[{split}]",
        )
    path, _ = find_source_file("beavertails", split, data_dir)
    _log_reading(path)
    recs = (
        (r, loc, _uid("beavertails", _idx(r, loc), split, pos))
        for r, loc, pos in _with_pos(_iter_file(path))
    )
    return _collect(recs, mapper, str(path))


def _hh_prompt_key(row: dict[str, Any]) -> str:
    text = row.get("chosen")
    if not isinstance(text, str):
        return ""
    cut = text.rfind("\n\nAssistant:")
    return text[: cut + len("\n\nAssistant:")] if cut >= 0 else text


def read_hh_rlhf(
    split: str,
    data_dir: str | Path | None = None,
    from_hub: bool = False,
    seed: int = 0,
    axis: Axis = Axis.HARMLESSNESS,
) -> list[Example]:
    """Read HH-RLHF harmless-base pairs for ``split`` (response = final ``chosen`` reply).

    Args:
        split: a split name; on the Hub, ``train``/``validation`` come from upstream train
            (validation = 5% of its distinct prompts by hash), ``test`` is upstream test.
        data_dir: data directory (``None``: ``$ALIGNX_DATA_DIR``), files under
            ``hh_rlhf_harmless/``.
        from_hub: read ``Anthropic/hh-rlhf`` with ``data_dir="harmless-base"``.
        seed: hash-split seed (Hub).
        axis: the axis the examples feed.

    Returns:
        The examples (see the module docstring for the filters).

    Raises:
        DataFormatError: malformed input.
        SourceNotFoundError: no file for the split (a ``FileNotFoundError``).
    """

    def mapper(row: dict[str, Any], uid: str, loc: Loc) -> Example:
        return map_hh_row(row, uid, axis, loc)

    if from_hub:
        _check_hub_split(split)
        up = "test" if split == "test" else "train"
        rows = _hub_rows(HUB_HH, up, _hub_load(HUB_HH, split=up, data_dir=HUB_HH_DATA_DIR))
        if split != "test":
            rows = _split_by_prompt(rows, lambda r: _hh_prompt_key(r[0]), "hh-rlhf-harmless", seed)[
                split
            ]
        return _collect(
            ((r, loc, f"hh_rlhf:{up}:{i}") for r, loc, i in rows), mapper, f"hub:{HUB_HH}[{split}]"
        )
    path, _ = find_source_file("hh_rlhf", split, data_dir)
    _log_reading(path)
    recs = (
        (r, loc, _uid("hh_rlhf", _idx(r, loc), split, pos))
        for r, loc, pos in _with_pos(_iter_file(path))
    )
    return _collect(recs, mapper, str(path))


def load_truthfulqa_hub() -> list[dict[str, Any]]:
    """All 817 ``truthful_qa`` rows in local field names (generation joined with
    multiple_choice on the stripped question text).

    Raises:
        RuntimeError: the Hub cannot be reached.
        DataFormatError: a generation question without multiple-choice targets.
    """
    gen = _hub_load(HUB_TRUTHFULQA, name="generation", split="validation")
    mc = _hub_load(HUB_TRUTHFULQA, name="multiple_choice", split="validation")
    by_q = {str(r["question"]).strip(): r for r in mc}
    out = []
    for i, g in enumerate(gen):
        m = by_q.get(str(g.get("question", "")).strip())
        if m is None:
            raise DataFormatError(
                Loc(f"hub:{HUB_TRUTHFULQA}[generation]", row=i + 1),
                "question",
                "no matching multiple_choice row",
            )
        out.append(truthfulqa_from_hub(dict(g), dict(m)))
    return out


def read_truthfulqa(
    split: str,
    data_dir: str | Path | None = None,
    from_hub: bool = False,
    seed: int = 0,
    axis: Axis = Axis.HONESTY,
    all_correct: bool = False,
) -> list[Example]:
    """Read TruthfulQA for ``split`` (response = ``Best Answer``).

    Args:
        split: a split name (local files also offer ``all``: never train *and* evaluate on it).
        data_dir: data directory (``None``: ``$ALIGNX_DATA_DIR``).
        from_hub: read ``truthful_qa`` (validation only upstream; split by hashing,
            stratified by category, as the local files are).
        seed: hash-split seed (Hub / upstream ``TruthfulQA.csv``).
        axis: the axis the examples feed.
        all_correct: one extra example per other correct answer (off by default).

    Returns:
        The examples.

    Raises:
        DataFormatError: malformed input.
        SourceNotFoundError: no file for the split (a ``FileNotFoundError``).
    """

    def mapper(row: dict[str, Any], uid: str, loc: Loc) -> list[Example]:
        return map_truthfulqa_row(row, uid, axis, loc, all_correct=all_correct)

    if from_hub:
        _check_hub_split(split)
        rows = [
            (r, Loc(f"hub:{HUB_TRUTHFULQA}[generation]", row=i + 1), i)
            for i, r in enumerate(load_truthfulqa_hub())
        ]
        part = split_truthfulqa(rows, seed)[split]
        return _collect(
            ((r, loc, f"truthfulqa:{i}") for r, loc, i in part),
            mapper,
            f"hub:{HUB_TRUTHFULQA}[{split}]",
        )
    path, whole = find_source_file("truthfulqa", split, data_dir)
    _log_reading(path)
    records = list(_with_pos(_iter_file(path, _TQA_COLUMNS)))
    for r, _loc, _ in records:  # CSV idx cells are strings
        if isinstance(r.get("idx"), str) and r["idx"].strip().isdigit():
            r["idx"] = int(r["idx"])
    if whole:
        rows = [
            (r, loc, _idx(r, loc) if _idx(r, loc) is not None else pos) for r, loc, pos in records
        ]
        part = split_truthfulqa(rows, seed)[split]
        return _collect(
            ((r, loc, f"truthfulqa:{i}") for r, loc, i in part), mapper, f"{path}[{split}]"
        )
    recs = ((r, loc, _uid("truthfulqa", _idx(r, loc), split, pos)) for r, loc, pos in records)
    return _collect(recs, mapper, str(path))


_READERS: dict[str, Callable[..., list[Example]]] = {
    "alpaca": read_alpaca,
    "beavertails": read_beavertails,
    "hh_rlhf": read_hh_rlhf,
    "truthfulqa": read_truthfulqa,
}


def read_source(
    name: str,
    axis: Axis,
    split: str,
    data_dir: Path | None,
    from_hub: bool = False,
    seed: int = 0,
    **options: Any,
) -> list[Example]:
    """Read one split of one source for one axis.

    Args:
        name: ``alpaca`` | ``beavertails`` | ``hh_rlhf`` | ``truthfulqa``.
        axis: the axis; must be one the source can feed (``AXIS_SPECS``).
        split: the split name.
        data_dir: local data directory; ``None`` falls back to ``$ALIGNX_DATA_DIR``
            (ignored with ``from_hub``).
        from_hub: load from the Hugging Face Hub instead.
        seed: seed of the Hub hash splits (0 reproduces the shared data folder).
        **options: reader-specific switches (``safe_only`` for beavertails,
            ``all_correct`` for truthfulqa).

    Returns:
        The examples of that split.

    Raises:
        ValueError: unknown source, or a source that cannot feed ``axis``.
        AlignXConfigError: no data directory configured (names ``data.data_dir`` and
            ``ALIGNX_DATA_DIR``).
        DataFormatError: malformed input (names file, line and field).
        SourceNotFoundError: the split's file is missing (also a ``FileNotFoundError``).
    """
    _check_source(name)
    if name not in AXIS_SPECS[axis].sources:
        raise ValueError(
            f"source {name!r} cannot feed axis {axis.value!r} "
            f"(valid: {', '.join(AXIS_SPECS[axis].sources)})"
        )
    if not from_hub:
        data_dir = resolve_data_dir(data_dir)
    return _READERS[name](
        split, data_dir=data_dir, from_hub=from_hub, seed=seed, axis=axis, **options
    )
