"""Read training data in any of the common chat-SFT shapes and normalise it once.

Accepted row shapes (JSONL, JSON list, or a Hugging Face dataset):

* ``{"messages": [{"role", "content"}, ...]}`` — the last assistant turn is the completion;
* ``{"prompt": str | messages, "completion": str | messages}``;
* ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`` (ShareGPT);
* ``{"question": str, "answer": str}`` (GSM8K; the ``#### N`` line becomes ``\\boxed{N}``).

The internal form is TRL's *conversational prompt-completion*: ``{"prompt": [messages...], "completion":
[{"role": "assistant", "content": ...}]}``. TRL then computes the loss on completion tokens only, through the
model's chat template. Earlier assistant turns of a multi-turn ``messages`` row stay in the prompt and are
not trained on by that record; ``load_records(turns="all")`` (``data.turns: all``, the training default) makes one
record per assistant turn instead, so every assistant turn is trained on whatever the chat template (TRL's
``assistant_only_loss`` needs ``{% generation %}`` markers, which SmolLM2's template lacks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}


class DataFormatError(ValueError):
    """A row that cannot be normalised; the message names the file, the line and what is missing."""


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def _as_messages(value: Any, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return [_message(m, where, f"{field}[{i}]") for i, m in enumerate(value)]
    raise DataFormatError(f"{where}: field {field!r} must be a non-empty string or list of messages, got {value!r:.80}")


def _message(m: Any, where: str, field: str) -> dict:
    if not isinstance(m, dict):
        raise DataFormatError(f"{where}: {field} must be an object with 'role' and 'content', got {m!r:.80}")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if role is None or content is None:
        missing = "role" if role is None else "content"
        raise DataFormatError(f"{where}: {field} has no {missing!r} (or ShareGPT 'from'/'value')")
    if str(role).lower() not in ROLE_ALIASES:
        raise DataFormatError(f"{where}: {field} has unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: {field} content must be a string, got {type(content).__name__}")
    return {"role": ROLE_ALIASES[str(role).lower()], "content": content}


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """Split a GSM8K answer into (worked solution ending in \\boxed{N}, N)."""
    body, _, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    body = re.sub(r"<<[^>]*>>", "", body).strip()  # the calculator annotations are not natural text
    return f"{body}\nThe answer is $\\boxed{{{final}}}$.", final


def normalize_row(row: Any, source: str = "<data>", line: int | None = None) -> dict:
    """One row of any accepted shape -> ``{"prompt": [...], "completion": [...]}`` (extra fields are dropped)."""
    where = _where(source, line)
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    if "messages" in row or "conversations" in row:
        field = "messages" if "messages" in row else "conversations"
        msgs = _as_messages(row[field], "user", where, field)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataFormatError(f"{where}: {field!r} has no assistant turn to train on")
        if last == 0 or not any(m["role"] == "user" for m in msgs[:last]):
            raise DataFormatError(f"{where}: {field!r} has no user turn before the last assistant turn")
        return _nonempty({"prompt": msgs[:last], "completion": [msgs[last]]}, where)
    if "prompt" in row and "completion" in row:
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        completion = _as_messages(row["completion"], "assistant", where, "completion")
        if [m["role"] for m in completion] != ["assistant"] * len(completion):
            raise DataFormatError(f"{where}: 'completion' must contain assistant messages only")
        return _nonempty({"prompt": prompt, "completion": completion}, where)
    if "question" in row and "answer" in row:
        solution, _ = gsm8k_solution(str(row["answer"]))
        if not str(row["answer"]).strip():
            raise DataFormatError(f"{where}: 'answer' is empty: there is nothing to train on")
        return {"prompt": [{"role": "user", "content": str(row["question"])}],
                "completion": [{"role": "assistant", "content": solution}]}
    keys = sorted(row)[:8]
    raise DataFormatError(
        f"{where}: row has none of the accepted shapes; expected 'messages', 'prompt'+'completion', "
        f"'conversations' (ShareGPT) or 'question'+'answer' (GSM8K), found keys {keys}"
    )


def _nonempty(rec: dict, where: str) -> dict:
    """An empty completion trains on the end-of-turn token alone: almost certainly a broken row, so refuse it."""
    if not any(m["content"].strip() for m in rec["completion"]):
        raise DataFormatError(f"{where}: the completion is empty: there is nothing to train on (fix or drop the row)")
    return rec


def iter_raw_rows(source: str | Path, split: str = "train") -> Iterable[tuple[Any, int | None]]:
    """Yield ``(row, line_number)`` from a JSONL/JSON file, a table (parquet/arrow/CSV/save_to_disk) or a Hugging
    Face dataset (``hf:DATASET[:CONFIG]:SPLIT`` or a bare name); see :mod:`rpsft.data.sources`."""
    from .sources import table_rows

    table = table_rows(source, split)
    if table is not None:
        yield from table
        return
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".json":
            raw = path.read_bytes()
            try:
                rows = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                raise DataFormatError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); re-save the file as "
                                      "UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise DataFormatError(f"{path}: a .json data file must hold a list of rows")
            for i, row in enumerate(rows):
                yield row, i + 1
            return
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                text = _decode(raw, path, n)
                if not text.strip():
                    continue
                try:
                    yield json.loads(text), n
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        return
    if path.is_dir() or str(source).endswith((".jsonl", ".json", ".parquet", ".arrow", ".csv")) \
            or looks_local(source):
        raise FileNotFoundError(f"data file {source} does not exist (generate the built-in data with "
                                f"`rpsft data synth-math`, or point data.train at a JSONL file)")
    if not hub_reachable():  # not a local file, and no hub to ask: say so now, not after minutes of retries
        raise FileNotFoundError(f"data file {source} does not exist, and it cannot be a hub dataset here (the hub is "
                                "unreachable or HF_HUB_OFFLINE is set); point data.train at a local file")
    from .sources import hub_rows  # a bare hub dataset name

    yield from hub_rows(str(source), split)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connect; False when offline mode is set."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def looks_local(source: str | Path) -> bool:
    """Whether ``source`` can only be meant as a local path: a hub id is exactly ``owner/name`` (or ``name``), so
    anything absolute, relative (``./``, ``~``), deeper, or under an existing local directory is a path."""
    s = str(source)
    parts = s.split("/")
    return (s.startswith(("/", ".", "~")) or "\\" in s or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _decode(raw: bytes, path: Path, line: int) -> str:
    """One line as UTF-8; a byte-order mark on the first line is accepted (editors on Windows write one)."""
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                              "re-save the file as UTF-8") from None


def load_records(source: str | Path, split: str = "train", limit: int | None = None, columns: dict | None = None,
                 turns: str = "last") -> list[dict]:
    """Normalised ``{"prompt", "completion"}`` records from ``source`` (first ``limit`` records if given).

    ``columns`` renames source columns first (``data.columns``); ``turns="all"`` makes one record per assistant
    turn of a multi-turn row (``data.turns``), ``"last"`` trains on the last assistant turn only."""
    from .sources import assistant_turns, rename_columns

    if turns not in ("all", "last"):
        raise DataFormatError(f"data.turns must be 'all' or 'last', got {turns!r}")
    out = []
    for row, line in iter_raw_rows(source, split):
        row = rename_columns(row, columns)
        for part in (assistant_turns(row) if turns == "all" else [row]):
            out.append(normalize_row(part, str(source), line))
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise DataFormatError(f"{source}: no rows")
    return out


def to_dataset(records: list[dict]):
    """A ``datasets.Dataset`` in TRL's conversational prompt-completion form."""
    import datasets

    return datasets.Dataset.from_list(records)
