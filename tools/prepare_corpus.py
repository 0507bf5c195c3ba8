#!/usr/bin/env python3
"""Curate raw text into train/validation JSONL shards that the `local_*` tasks read.

    python tools/prepare_corpus.py --input '/raw/**/*.txt' '/raw/*.jsonl' --output_dir /data/corpus
    # then, in gin:  local_corpus.pattern = '/data/corpus/{split}-*.jsonl'

Steps, in order (each drop is counted and shown in the summary table):
  1. list files; non-UTF-8 files are skipped and counted (or fatal with --non_utf8=fail)
  2. read documents (a line, a whole file, or a JSONL field per document) and normalise unicode
  3. filter by length, symbol ratio and repetition (thresholds are flags)
  4. drop exact duplicates (hash of the normalised text)
  5. drop near duplicates: MinHash signatures of word n-gram shingles, LSH banding to find
     candidates, kept if the estimated Jaccard similarity with every earlier kept document is
     below --near_dup_threshold
  6. assign each document to validation by a hash of its text, write round-robin shards.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import re
import sys
import unicodedata
import zlib
from typing import Iterator, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5x_lite.data import sources  # noqa: E402  pylint: disable=g-import-not-at-top

_MERSENNE = (1 << 31) - 1  # MinHash works modulo this prime: a*x+b stays within uint64


# ------------------------------------------------------------------------------ quality filters

def symbol_ratio(text: str) -> float:
  """Share of characters that are neither letters/digits nor whitespace."""
  if not text:
    return 0.0
  symbols = sum(1 for c in text if not (c.isalnum() or c.isspace()))
  return symbols / len(text)


def duplicate_line_fraction(text: str) -> float:
  """Share of non-empty lines that repeat an earlier line of the same document."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def top_ngram_fraction(words: Sequence[str], n: int = 2) -> float:
  """Share of the characters covered by the most frequent repeated word n-gram (as in Gopher)."""
  if len(words) < n + 1:
    return 0.0
  counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  gram, count = counts.most_common(1)[0]
  if count == 1:  # nothing repeats
    return 0.0
  total = sum(len(w) for w in words)
  return count * sum(len(w) for w in gram) / total if total else 0.0


# ------------------------------------------------------------------------------ MinHash + LSH

class NearDuplicateIndex:
  """MinHash/LSH index of the documents kept so far.

  A document's signature is, for each of `num_perm` random hash functions h(x) = (a*x + b) mod p,
  the minimum over its shingles. Two signatures agree in a position with probability equal to the
  Jaccard similarity of the shingle sets. Signatures are cut into `bands`; documents sharing any
  whole band are candidates, and a candidate is a duplicate if the signatures agree in at least
  `threshold` of the positions.
  """

  def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8,
               shingle_size: int = 5, seed: int = 0):
    if num_perm % bands:
      raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands}).")
    rng = np.random.default_rng(seed)
    self._a = rng.integers(1, _MERSENNE, num_perm, dtype=np.uint64)
    self._b = rng.integers(0, _MERSENNE, num_perm, dtype=np.uint64)
    self._bands, self._rows = bands, num_perm // bands
    self._threshold, self._shingle_size = threshold, shingle_size
    self._buckets: dict[tuple[int, bytes], list[int]] = collections.defaultdict(list)
    self._signatures: list[np.ndarray] = []

  def signature(self, words: Sequence[str]) -> np.ndarray:
    k = self._shingle_size
    shingles = {" ".join(words[i:i + k]) for i in range(max(len(words) - k + 1, 1))}
    x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), np.uint64, len(shingles))
    x %= np.uint64(_MERSENNE)
    sig = np.full(len(self._a), _MERSENNE, np.uint64)
    for start in range(0, len(x), 4096):  # bounded memory for long documents
      chunk = x[start:start + 4096]
      hashed = (self._a[:, None] * chunk[None, :] + self._b[:, None]) % np.uint64(_MERSENNE)
      sig = np.minimum(sig, hashed.min(axis=1))
    return sig.astype(np.uint32)

  def add_if_new(self, words: Sequence[str]) -> bool:
    """Adds the document and returns True, or returns False if it near-duplicates a kept one."""
    sig = self.signature(words)
    keys = [(band, sig[band * self._rows:(band + 1) * self._rows].tobytes())
            for band in range(self._bands)]
    candidates = {i for key in keys for i in self._buckets.get(key, ())}
    for i in candidates:
      if np.mean(self._signatures[i] == sig) >= self._threshold:
        return False
    index = len(self._signatures)
    self._signatures.append(sig)
    for key in keys:
      self._buckets[key].append(index)
    return True


# ------------------------------------------------------------------------------ the pipeline

@dataclasses.dataclass
class Options:
  unicode_form: str = "NFC"
  min_chars: int = 20
  max_chars: int = 1_000_000
  max_symbol_ratio: float = 0.5
  max_dup_line_frac: float = 0.5
  max_top_ngram_frac: float = 0.3
  near_dup_threshold: float = 0.8
  num_perm: int = 128
  bands: int = 16
  shingle_size: int = 5
  validation_percent: float = 2.0
  num_shards: int = 4


def read_documents(config: sources.CorpusConfig) -> Iterator[str]:
  for path in sources.list_corpus(config, "train").files:
    fmt = config.resolved_format(path)
    with open(path, encoding="utf-8") as f:
      if fmt == "files":
        yield f.read()
        continue
      for line in f:
        if fmt == "jsonl":
          value = json.loads(line).get(config.text_key) if line.strip() else None
          yield value if isinstance(value, str) else ""
        else:
          yield line.rstrip("\n")


def reject_reason(text: str, words: Sequence[str], opts: Options) -> str | None:
  """The first quality filter `text` fails, as a summary-table row label, or None."""
  if not text.strip():
    return "empty"
  if len(text) < opts.min_chars:
    return f"too short (< {opts.min_chars} chars)"
  if len(text) > opts.max_chars:
    return f"too long (> {opts.max_chars} chars)"
  if symbol_ratio(text) > opts.max_symbol_ratio:
    return f"symbol ratio > {opts.max_symbol_ratio}"
  if duplicate_line_fraction(text) > opts.max_dup_line_frac:
    return f"repeated lines > {opts.max_dup_line_frac}"
  if top_ngram_fraction(words) > opts.max_top_ngram_frac:
    return f"top 2-gram share > {opts.max_top_ngram_frac}"
  return None


def prepare(config: sources.CorpusConfig, output_dir: str, opts: Options) -> dict:
  """Runs the pipeline; returns the summary counters (also written to output_dir/stats.json)."""
  listing = sources.list_corpus(config, "train")
  os.makedirs(output_dir, exist_ok=True)
  shards = {split: [open(os.path.join(output_dir, f"{split}-{i:05d}-of-{opts.num_shards:05d}.jsonl"),
                         "w", encoding="utf-8") for i in range(opts.num_shards)]
            for split in sources.SPLITS}
  stats = collections.Counter({"input files": len(listing.files) + len(listing.skipped_non_utf8),
                               "skipped non-UTF-8 files": len(listing.skipped_non_utf8)})
  chars = collections.Counter()
  seen_exact: set[bytes] = set()
  near = NearDuplicateIndex(opts.num_perm, opts.bands, opts.near_dup_threshold, opts.shingle_size)
  written = collections.Counter()
  try:
    for raw in read_documents(config):
      text = raw if opts.unicode_form == "none" else unicodedata.normalize(opts.unicode_form, raw)
      text = text.strip()
      stats["input documents"] += 1
      chars["input documents"] += len(text)
      words = re.findall(r"\w+", text.lower())
      reason = reject_reason(text, words, opts)
      if reason is None:
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen_exact:
          reason = "exact duplicates"
        else:
          seen_exact.add(digest)
          if not near.add_if_new(words):
            reason = f"near duplicates (Jaccard >= {opts.near_dup_threshold})"
      if reason:
        stats[reason] += 1
        chars[reason] += len(text)
        continue
      split = ("validation" if sources._hash_percent(text) < opts.validation_percent  # pylint: disable=protected-access
               else "train")
      shard = shards[split][written[split] % opts.num_shards]
      shard.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
      written[split] += 1
      chars[split] += len(text)
  finally:
    for files in shards.values():
      for f in files:
        f.close()
  stats.update({"kept": written["train"] + written["validation"], "train": written["train"],
                "validation": written["validation"]})
  chars["kept"] = chars["train"] + chars["validation"]
  summary = {"documents": dict(stats), "chars": dict(chars)}
  with open(os.path.join(output_dir, "stats.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def format_summary(summary: dict) -> str:
  """The summary as an aligned text table: what came in, what each filter dropped, what was kept."""
  docs, chars = summary["documents"], summary["chars"]
  head = ["input files", "skipped non-UTF-8 files", "input documents"]
  tail = ["kept", "train", "validation"]
  drops = sorted(k for k in docs if k not in head + tail)
  rows = ([(k, k) for k in head] + [(f"  dropped: {k}", k) for k in drops] +
          [("kept", "kept"), ("  train", "train"), ("  validation", "validation")])
  width = max(len(label) for label, _ in rows) + 2
  lines = [f"{'stage':<{width}}{'documents':>12}{'characters':>16}", "-" * (width + 28)]
  for label, key in rows:
    c = chars.get(key)
    lines.append(f"{label:<{width}}{docs.get(key, 0):>12,}{'' if c is None else f'{c:,}':>16}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", nargs="+", required=True, help="glob pattern(s) of input files")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--format", default="auto", choices=sources.FORMATS)
  parser.add_argument("--text_key", default="text")
  parser.add_argument("--non_utf8", default="skip", choices=("skip", "fail"))
  defaults = Options()
  parser.add_argument("--unicode_form", default=defaults.unicode_form,
                      choices=("NFC", "NFKC", "NFD", "NFKD", "none"))
  for field in dataclasses.fields(Options):
    if field.name != "unicode_form":
      default = getattr(defaults, field.name)
      parser.add_argument(f"--{field.name}", type=type(default), default=default)
  args = parser.parse_args(argv)
  opts = Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)})
  config = sources.CorpusConfig(patterns=tuple(args.input), format=args.format,
                                text_key=args.text_key, non_utf8=args.non_utf8,
                                validation_percent=0.0)
  summary = prepare(config, args.output_dir, opts)
  print(format_summary(summary))
  print(f"\nWrote {args.output_dir}/{{train,validation}}-*.jsonl. Use it with:\n"
        f"  --gin.local_corpus.pattern=\"'{os.path.abspath(args.output_dir)}/{{split}}-*.jsonl'\" "
        "--gin.MIXTURE_OR_TASK_NAME=\"'local_span_corruption'\"")
  return summary


if __name__ == "__main__":
  main()
