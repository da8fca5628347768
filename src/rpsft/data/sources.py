"""Where rows come from: JSONL/JSON files, parquet/arrow/CSV files, ``save_to_disk`` directories and Hugging Face
hub datasets (``hf:DATASET[:CONFIG]:SPLIT``), all through the ``datasets`` loaders; plus the column mapping and the
multi-turn expansion applied before rows are normalised.

A hub name is written ``hf:openai/gsm8k:main:train`` (dataset, config, split) or ``hf:HuggingFaceH4/MATH-500:test``
(no config); a bare ``DATASET`` that is not a local path is still read as a hub name with the default split. A hub
that cannot be reached (offline, unknown name, gated data) is one line naming the dataset, not a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class DataSourceError(ValueError):
    """A data source that cannot be opened; the message names it and what would work."""


@dataclass(frozen=True)
class HubSpec:
    name: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return f"hf:{self.name}" + (f":{self.config}" if self.config else "") + f":{self.split}"


def parse_hf_spec(spec: str, default_split: str = "train") -> HubSpec:
    """``hf:DATASET[:CONFIG]:SPLIT`` (or ``hf:DATASET``) -> HubSpec."""
    body = spec[3:] if spec.startswith("hf:") else spec
    parts = body.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise DataSourceError(f"bad hub dataset {spec!r}: write hf:DATASET[:CONFIG]:SPLIT, e.g. "
                              f"hf:openai/gsm8k:main:train or hf:HuggingFaceH4/MATH-500:test")
    if len(parts) == 1:
        return HubSpec(parts[0], None, default_split)
    if len(parts) == 2:
        return HubSpec(parts[0], None, parts[1])
    return HubSpec(parts[0], parts[1], parts[2])


def load_hub(spec: HubSpec):
    """``datasets.load_dataset`` for a hub spec; any failure to reach or read it is a one-line DataSourceError."""
    import datasets

    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # offline (ConnectionError, OfflineModeIsEnabled), unknown/gated dataset, bad split
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataSourceError(
            f"cannot load hub dataset {spec} ({type(e).__name__}: {first}); check the name, config and split, or "
            f"use a local copy (a JSONL/parquet file or a save_to_disk directory)") from None


def _load_local_table(path: Path):
    """A parquet/arrow/CSV file, a ``save_to_disk`` directory or a directory of parquet files -> a Dataset (or
    DatasetDict for save_to_disk of several splits)."""
    import datasets

    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        files = sorted(path.glob("*.parquet"))
        if files:
            return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        raise DataSourceError(f"{path} is a directory but neither a save_to_disk dataset (state.json / "
                              f"dataset_dict.json) nor a folder of .parquet files")
    kind = TABLE_SUFFIXES[path.suffix]
    if kind == "arrow":
        return datasets.Dataset.from_file(str(path))
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _pick_split(ds, split: str, where: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{where} has splits {sorted(ds)}, not {split!r}; set data.split")
        return ds[split]
    return ds


def table_rows(source: str | Path, split: str = "train") -> Iterator[tuple[Any, int]] | None:
    """``(row, index)`` for sources read through ``datasets`` (parquet, arrow, CSV, save_to_disk, ``hf:``), or None
    for a source that is not one of them (JSONL/JSON files are read line by line elsewhere, with line numbers)."""
    text = str(source)
    if text.startswith("hf:"):
        spec = parse_hf_spec(text, split)
        return _enumerate(load_hub(spec))
    path = Path(text).expanduser()
    if (path.is_file() and path.suffix in TABLE_SUFFIXES) or path.is_dir():
        return _enumerate(_pick_split(_load_local_table(path), split, str(path)))
    return None


def _enumerate(ds) -> Iterator[tuple[Any, int]]:
    for i, row in enumerate(ds):
        yield row, i + 1


def hub_rows(name: str, split: str) -> Iterator[tuple[Any, int]]:
    """A bare hub name (no ``hf:`` prefix, not a local path): the dataset's default config."""
    return _enumerate(load_hub(HubSpec(name, None, split)))


def rename_columns(row: Any, columns: dict | None) -> Any:
    """``data.columns``: ``{source_name: our_name}``, e.g. ``{instruction: prompt, output: completion}``."""
    if not columns or not isinstance(row, dict):
        return row
    if not isinstance(columns, dict):
        raise DataSourceError(f"data.columns must map source column -> our column, e.g. {{instruction: prompt}}, "
                              f"got {columns!r}")
    out = dict(row)
    for src, dst in columns.items():
        if src in out:
            out[dst] = out.pop(src)
    return out


def assistant_turns(row: Any) -> Iterable[Any]:
    """A multi-turn ``messages`` / ``conversations`` row -> one row per assistant turn that follows a user turn,
    each holding the conversation up to and including that turn, so that every assistant turn is a completion
    (trained on) and the turns before it are its prompt (not trained on). Other rows pass through unchanged."""
    if not isinstance(row, dict):
        return [row]
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    msgs = row.get(key) if key else None
    if not isinstance(msgs, list):
        return [row]

    def role(m):
        r = str(m.get("role", m.get("from", ""))).lower() if isinstance(m, dict) else ""
        return "assistant" if r in ("assistant", "gpt", "bot", "model") else "user" if r in ("user", "human") else r

    ends = [i for i, m in enumerate(msgs) if role(m) == "assistant"
            and any(role(p) == "user" for p in msgs[:i])]
    if len(ends) <= 1:
        return [row]
    return [{**row, key: msgs[: i + 1]} for i in ends]
