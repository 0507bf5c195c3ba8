"""Data faults: the records a reader skipped, counted per (kind, file) and reported, never silent.

A reader (sources.read_text_files, jsonl_rows, preferences, instructions) calls `FAULTS.add` for
each record it skips: the first of each kind in a file is logged with its file:line and the fix,
and a file where they pass `max_bad_fraction` of the records read (after `MIN_BAD_RECORDS`), or
any bad record with bad_records='fail', stops the run with a CorpusError naming the file.
`data_faults()` is the summary the train job prints after training. Other modules add their own
kinds with `KIND_NAMES` and `_FIX` (jsonl_rows.register_fault_kind).
"""
from __future__ import annotations

import dataclasses
import logging
import threading


class CorpusError(ValueError):
  """A corpus that cannot be read: no files, empty, or not UTF-8 (with fail mode)."""


MIN_BAD_RECORDS = 20  # a file is judged by its share of bad records only after this many


class DataFaults:
  """Records skipped while reading, counted per (kind, file) in this process (all threads).

  Kinds: "missing_key" (a JSON object without a string at the text key), "malformed" (a line
  that is not a JSON object), "non_utf8" (a line, or a "files" document, that is not UTF-8).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.lines: dict[tuple[str, str], set[int]] = {}  # the skipped lines (another epoch or a
    # resume reads them again: each counts once)
    self.first: dict[tuple[str, str], str] = {}  # where and what the first one was
    self.read: dict[str, int] = {}  # records read per file: the highest line number seen
    self.fixes: dict[str, None] = {}  # what to do about them, in order (a set with order)
    self.fatal: CorpusError | None = None

  def clear(self) -> None:
    with self._lock:
      self.lines.clear(), self.first.clear(), self.read.clear(), self.fixes.clear()
      self.fatal = None

  @property
  def counts(self) -> dict[tuple[str, str], int]:
    return {key: len(lines) for key, lines in self.lines.items()}

  def count_read(self, path: str, line: int) -> None:
    with self._lock:
      self.read[path] = max(self.read.get(path, 0), line)

  def add(self, kind: str, path: str, line: int, detail: str, config: "_ReadConfig") -> None:
    """Counts one skipped record; raises CorpusError when the config says to stop."""
    with self._lock:
      key = (kind, path)
      self.lines.setdefault(key, set()).add(line)
      if key not in self.first:
        self.first[key] = f"line {line}: {detail}"
        self.fixes.setdefault(_FIX[kind](config), None)
        logging.warning("%s:%d: %s; skipped (%s). Further such records in this file are "
                        "counted, not logged.", path, line, detail, _FIX[kind](config))
      bad = sum(len(lines) for (_, p), lines in self.lines.items() if p == path)
      read = max(self.read.get(path, 0), bad)
      if config.fail_at_first and kind != "non_utf8":
        self.fatal = CorpusError(f"{path}:{line}: {detail}. {_FIX[kind](config)}.")
      elif bad >= MIN_BAD_RECORDS and bad > config.max_bad_fraction * read:
        self.fatal = CorpusError(
            f"{path}: {bad} of the {read} records read so far were skipped ({self._kinds(path)})"
            f", more than max_bad_fraction={config.max_bad_fraction:g}; first at "
            f"{self.first[key]}. {_FIX[kind](config)}; or raise max_bad_fraction (e.g. "
            "--gin.local_corpus.max_bad_fraction=0.5) if the file is meant to be like that.")
      if self.fatal is not None:
        raise self.fatal

  def _kinds(self, path: str) -> str:
    return ", ".join(f"{n} {KIND_NAMES[kind]}" for (kind, p), n in sorted(self.counts.items())
                     if p == path)

  def summary(self) -> list[str]:
    """One line per file and kind, e.g. "a.jsonl: 3 records without 'text' (first at ...)"."""
    with self._lock:
      return [f"{path}: {n:,} {KIND_NAMES[kind]} (first at {self.first[(kind, path)]})"
              for (kind, path), n in sorted(self.counts.items(), key=lambda kv: kv[0][::-1])]


KIND_NAMES = {"missing_key": "record(s) without the text key",
              "malformed": "malformed record(s)", "non_utf8": "non-UTF-8 record(s)"}
_FIX = {
    "missing_key": lambda c: (f"Set text_key to the field holding the text (e.g. "
                              f"--gin.local_corpus.text_key=\"'body'\"; now {c.text_key!r})"),
    "malformed": lambda c: ("Fix or delete that line, or set bad_records='skip' to skip such "
                            "records" if c.fail_at_first else
                            "Fix or delete such lines (bad_records='fail' stops at the first)"),
    "non_utf8": lambda c: ("Convert the file (iconv -f <encoding> -t utf-8), or set "
                           "non_utf8='replace' to keep such lines with U+FFFD"),
}
FAULTS = DataFaults()


def data_faults() -> list[str]:
  """What the input pipeline of this process skipped so far, one line per file and kind."""
  return FAULTS.summary()


@dataclasses.dataclass(frozen=True)
class _ReadConfig:
  text_key: str = "text"
  non_utf8: str = "skip"
  fail_at_first: bool = False  # bad_records == "fail"
  max_bad_fraction: float = 1.0
