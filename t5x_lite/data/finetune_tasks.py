"""Sources and metrics for the built-in text-to-text tasks (fine-tuning and evaluation with no
download):

  code_to_docstring: inputs = a standard-library function's source with its docstring removed,
                     targets = the docstring's first sentence. Split by file, like the corpus.
  addition:          inputs = "123 + 4567", targets = "4690". Generated deterministically; a pair
                     belongs to validation iff its text hashes into bucket 0, so the splits never
                     overlap.
"""
from __future__ import annotations

import collections
import functools
import inspect
import io
import os
import re
import textwrap
import tokenize
from typing import Sequence

import seqio
import tensorflow as tf

from t5x_lite.data import sources

AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions use no Python control flow on tensors, so AutoGraph conversion would only
# cost tracing time (tens of ms per function, seconds per pipeline).
plain = tf.autograph.experimental.do_not_convert


# ------------------------------------------------------------------------------ code_to_docstring

def first_sentence(docstring: str) -> str:
  """The first sentence of a docstring's first paragraph, on one line."""
  paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
  match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
  return match.group(1) if match else paragraph


def _logical_lines(source: str) -> list[tuple[int, list[tokenize.TokenInfo]]]:
  """(indent depth, significant tokens) of each logical line, comments and blank lines dropped."""
  lines, current, depth = [], [], 0
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.INDENT:
      depth += 1
    elif tok.type == tokenize.DEDENT:
      depth -= 1
    elif tok.type == tokenize.NEWLINE:
      if current:
        lines.append((depth, current))
      current = []
    elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
      current.append(tok)
  return lines


def _string_value(tok: tokenize.TokenInfo) -> str | None:
  """The value of a plain string-literal token (None for bytes/f-strings, like ast docstrings)."""
  prefix = tok.string[:len(tok.string) - len(tok.string.lstrip("rRuUbBfF"))].lower()
  if "b" in prefix or "f" in prefix:
    return None
  try:  # compiling a lone literal is safe and, unlike ast, thread-safe (see extract_functions)
    value = eval(compile(tok.string, "<docstring>", "eval"), {"__builtins__": {}})  # pylint: disable=eval-used
  except (SyntaxError, ValueError):
    return None
  return value if isinstance(value, str) else None


def extract_functions(source: str, max_chars: int = 4000) -> list[tuple[str, str]]:
  """(function source without its docstring, first sentence of the docstring) pairs.

  Works on tokens rather than `ast`: in CPython 3.11 `ast.parse` is not safe to call from
  tf.data's threads while another thread (e.g. TF autograph tracing) also builds an AST - it fails
  with "AST constructor recursion depth mismatch". Results match `ast` (see the test).

  Skipped: one-line functions, functions whose docstring is their whole body (nothing left to
  describe), docstrings sharing a line with code, very short/long first sentences, huge functions.
  """
  try:
    logical = _logical_lines(source)
  except (tokenize.TokenError, SyntaxError):  # e.g. deliberately broken files in Lib/test
    return []
  lines = source.splitlines(keepends=True)
  pairs = []
  for i, (depth, toks) in enumerate(logical):
    is_def = toks[0].string == "def" or [t.string for t in toks[:2]] == ["async", "def"]
    if not is_def or toks[-1].string != ":":  # not a def, or a one-line def
      continue
    body = []
    for line in logical[i + 1:]:
      if line[0] <= depth:
        break
      body.append(line)
    statements = [toks_ for d, toks_ in body if d == depth + 1]
    if len(statements) < 2 or len(statements[0]) != 1 or statements[0][0].type != tokenize.STRING:
      continue
    doc_tok = statements[0][0]
    docstring = _string_value(doc_tok)
    if not docstring or not docstring.strip():
      continue
    def_line, end_line = toks[0].start[0], body[-1][1][-1].end[0]
    kept = lines[def_line - 1:doc_tok.start[0] - 1] + lines[doc_tok.end[0]:end_line]
    code = textwrap.dedent("".join(kept)).rstrip() + "\n"
    target = first_sentence(inspect.cleandoc(docstring))
    if 8 <= len(target) <= 300 and len(code) <= max_chars:
      pairs.append((code, target))
  return pairs


@functools.lru_cache(maxsize=None)
def _extract_cached(path: str, size: int, mtime_ns: int) -> tuple[list[bytes], list[bytes]]:
  """Pairs of one file, memoised: parsing is the slow part and the results are small (the
  whole stdlib gives a few thousand pairs), so later epochs and other datasets reuse them."""
  del size, mtime_ns  # part of the cache key only
  with open(path, encoding="utf-8") as f:
    pairs = extract_functions(f.read())
  return [p[0].encode() for p in pairs], [p[1].encode() for p in pairs]


def _extract_file(path: tf.Tensor):
  path = path.numpy().decode()
  st = os.stat(path)
  code, doc = _extract_cached(path, st.st_size, st.st_mtime_ns)
  return (tf.constant(code, tf.string, shape=[len(code)]),
          tf.constant(doc, tf.string, shape=[len(doc)]))


class CodeToDocstringSource(seqio.DataSource):
  """{"code", "docstring"} pairs parsed from the stdlib corpus files, a few files at a time."""

  def __init__(self, corpus=sources.stdlib_corpus):
    self._corpus = corpus
    super().__init__(splits=sources.SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return sources.list_corpus(self._corpus(), split).files

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    ds = sources.shard_files(self.list_shards(split), shard_info, shuffle, seed)

    def parse(path):
      code, doc = tf.py_function(_extract_file, [path], [tf.string, tf.string])
      code.set_shape([None])
      doc.set_shape([None])
      return {"code": code, "docstring": doc}

    # Tokenizing is Python, so parallelism is bounded by the GIL; 2 calls overlap file I/O.
    return ds.map(plain(parse), num_parallel_calls=2).unbatch()


# ------------------------------------------------------------------------------ addition

class AdditionSource(seqio.DataSource):
  """{"question": "a + b", "answer": "a+b"} with operands of 1..max_digits digits."""

  VALIDATION_BUCKETS = 20  # 1 in 20 pairs (by hash of the question) is held out
  BLOCK = 1024  # examples drawn per random op: per-example tf.data overhead would dominate

  def __init__(self, max_digits: int = 4, num_validation: int = 2000):
    self._max_digits = max_digits
    self._num_validation = num_validation
    super().__init__(splits=sources.SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def num_input_examples(self, split: str) -> int | None:
    return self._num_validation if split == "validation" else None  # train never ends

  def _operands(self, seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    # Draw the digit count first, so short and long numbers are equally common.
    digits = tf.random.stateless_uniform([self.BLOCK], seeds[0], 1, self._max_digits + 1,
                                         dtype=tf.int64)
    high = tf.cast(10.0 ** tf.cast(digits, tf.float64), tf.int64)
    unit = tf.random.stateless_uniform([self.BLOCK], seeds[1], dtype=tf.float64)
    return tf.minimum(tf.cast(unit * tf.cast(high, tf.float64), tf.int64), high - 1)

  def _block(self, key, index):
    """BLOCK examples from the stateless seed (key, index)."""
    seeds = tf.random.experimental.stateless_split(tf.stack([key, index]), 2)
    a, b = self._operands(seeds[0]), self._operands(seeds[1])
    question = tf.strings.join([tf.strings.as_string(a), " + ", tf.strings.as_string(b)])
    return {"question": question, "answer": tf.strings.as_string(a + b)}

  def _is_validation(self, ex):
    return tf.equal(tf.strings.to_hash_bucket_fast(ex["question"], self.VALIDATION_BUCKETS), 0)

  def _examples(self, key, blocks: tf.data.Dataset, validation: bool) -> tf.data.Dataset:
    def pick(block):
      keep = self._is_validation(block)
      keep = keep if validation else tf.logical_not(keep)
      return {k: tf.boolean_mask(v, keep) for k, v in block.items()}
    return blocks.map(plain(lambda i: pick(self._block(key, i))),
                      num_parallel_calls=AUTOTUNE).unbatch()

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    shard, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    if split == "validation":  # fixed, whatever the seed: an eval set must not move
      blocks = tf.data.Dataset.range(1 << 40)
      ds = self._examples(tf.constant(7, tf.int64), blocks, True).take(self._num_validation)
      return ds.shard(num_shards, shard)
    key = tf.constant(seed if (shuffle and seed is not None) else 0, tf.int64)
    return self._examples(key, tf.data.Dataset.range(shard, 1 << 62, num_shards), False)


# ------------------------------------------------------------------------------ metrics

def postprocess_text(output, example=None, is_target=False):
  """Decoded model output or target -> stripped str."""
  del example, is_target
  return (output.decode("utf-8", "replace") if isinstance(output, bytes) else output).strip()


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target (after stripping)."""
  if not targets:
    return {"exact_match": 0.0}
  hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / len(targets)}


def _words(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
  if overlap == 0:
    return 0.0
  p, r = overlap / n_pred, overlap / n_ref
  return 2 * p * r / (p + r)


def _ngram_f1(ref: list[str], pred: list[str], n: int) -> float:
  grams = lambda w: collections.Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
  r, p = grams(ref), grams(pred)
  return _f1(sum((r & p).values()), sum(p.values()), sum(r.values()))


def _lcs(a: list[str], b: list[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (x100) on lower-cased word tokens, averaged."""
  totals = collections.Counter()
  for target, prediction in zip(targets, predictions):
    ref, pred = _words(target), _words(prediction)
    totals["rouge1"] += _ngram_f1(ref, pred, 1)
    totals["rouge2"] += _ngram_f1(ref, pred, 2)
    totals["rougeL"] += _f1(_lcs(ref, pred), len(pred), len(ref))
  n = max(len(targets), 1)
  return {k: 100.0 * totals[k] / n for k in ("rouge1", "rouge2", "rougeL")}
