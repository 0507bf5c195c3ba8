"""t5x_lite/data/finetune_tasks.py: code_to_docstring extraction, the addition generator, metrics."""
import ast
import glob
import os
import textwrap

import gin
import pytest
import seqio

from t5x_lite.data import finetune_tasks as ft
from t5x_lite.data import sources


def ast_reference(source):
  """What extract_functions must return, computed with `ast` (fine in a single thread)."""
  lines, pairs = source.splitlines(keepends=True), []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
      continue
    doc = node.body[0]
    if doc.lineno == node.lineno or lines[doc.end_lineno - 1][doc.end_col_offset:].strip():
      continue
    kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    code = textwrap.dedent("".join(kept)).rstrip() + "\n"
    target = ft.first_sentence(docstring)
    if 8 <= len(target) <= 300 and len(code) <= 4000:
      pairs.append((code, target))
  return sorted(pairs)


EDGE_CASES = '''
import functools

@functools.lru_cache()
def decorated(
    a,   # a multi-line signature
    b: "int" = 2,
) -> dict[str, int]:
    r"""Return a mapping. Second sentence is dropped.

    More text.
    """
    return {"a": a}

def one_liner(): "Not extracted: a one-line function."; return 1

def only_docstring():
    """Not extracted: nothing left once the docstring is gone."""

async def fetch(url):
    \'\'\'Fetch the url!\'\'\'
    # a comment
    async with open(url) as f:
        return await f.read()

class Outer:
    def method(self):
        """Methods are dedented too."""
        def inner():
            """Nested functions count on their own."""
            return 2
        return inner()

def fstring_doc():
    f"""Not a docstring: an f-string."""
    return 3

def short():
    """Short."""
    pass
'''


def test_extraction_matches_ast_on_edge_cases_and_real_files():
  got = sorted(ft.extract_functions(EDGE_CASES))
  assert got == ast_reference(EDGE_CASES)
  targets = {t for _, t in got}
  assert targets == {"Return a mapping.", "Fetch the url!", "Methods are dedented too.",
                     "Nested functions count on their own."}
  code = dict((t, c) for c, t in got)
  assert code["Return a mapping."].startswith("def decorated(\n    a,   # a multi-line")
  assert '"""' not in code["Return a mapping."] and "More text" not in code["Return a mapping."]
  assert code["Methods are dedented too."].startswith("def method(self):\n    def inner():")
  files = sorted(glob.glob(os.path.join(sources.STDLIB_ROOT, "json", "*.py")))
  files += [os.path.join(sources.STDLIB_ROOT, n) for n in ("textwrap.py", "shlex.py", "inspect.py")]
  total = 0
  for path in files:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    assert sorted(ft.extract_functions(source)) == ast_reference(source), path
    total += len(ast_reference(source))
  assert total > 100
  assert ft.extract_functions("def broken(:\n  pass") == []


def test_first_sentence():
  assert ft.first_sentence("Do a thing. Then more.") == "Do a thing."
  assert ft.first_sentence("Spans\n  two lines? Yes.") == "Spans two lines?"
  assert ft.first_sentence("No full stop\n\nSecond paragraph.") == "No full stop"
  assert ft.first_sentence("Version 1.5 is used.") == "Version 1.5 is used."


def test_code_to_docstring_source_is_split_by_file():
  gin.bind_parameter("stdlib_corpus.max_files", 10)
  source = ft.CodeToDocstringSource()
  train = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
  validation = list(source.get_dataset("validation", shuffle=False).as_numpy_iterator())
  assert len(train) >= 5 and len(validation) >= 5, (len(train), len(validation))
  assert not {ex["code"] for ex in train} & {ex["code"] for ex in validation}
  files = sources.list_corpus(sources.stdlib_corpus(), "train").files
  expected = sum(len(ft.extract_functions(open(f, encoding="utf-8").read())) for f in files)
  assert len(train) == expected


def test_addition_is_correct_deterministic_and_splits_never_overlap():
  source = ft.AdditionSource(max_digits=4, num_validation=300)
  def questions_answers(ds, n):  # batched: iterating examples one by one from Python is slow
    batch = next(ds.batch(n).as_numpy_iterator())
    return [q.decode() for q in batch["question"]], [a.decode() for a in batch["answer"]]

  train, answers = questions_answers(source.get_dataset("train", seed=5), 3000)
  assert questions_answers(source.get_dataset("train", seed=5), 50)[0] == train[:50]
  assert questions_answers(source.get_dataset("train", seed=6), 50)[0] != train[:50]
  digits = set()
  for question, answer in zip(train, answers):
    a, b = question.split(" + ")
    assert int(answer) == int(a) + int(b)
    digits |= {len(a), len(b)}
  assert digits == {1, 2, 3, 4}
  validation = questions_answers(source.get_dataset("validation", shuffle=True, seed=9), 1000)[0]
  assert len(validation) == 300
  assert validation == questions_answers(source.get_dataset("validation", shuffle=False), 300)[0]
  assert not set(train) & set(validation)
  shards = [questions_answers(source.get_dataset(
      "train", seed=5, shard_info=seqio.ShardInfo(i, 2)), 100)[0] for i in range(2)]
  assert not set(shards[0]) & set(shards[1])


def test_metrics():
  assert ft.exact_match(["12", " 7 "], ["12", "8"]) == {"exact_match": 50.0}
  perfect = ft.rouge(["Return the sum."], ["return the sum"])
  assert perfect == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
  assert ft.rouge(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  # reference "a b c d", prediction "a c d e": unigrams 3/4 each way; bigram "c d" 1/3;
  # LCS "a c d" = 3 -> 0.75.
  scores = ft.rouge(["a b c d"], ["a c d e"])
  assert scores["rouge1"] == pytest.approx(75.0)
  assert scores["rouge2"] == pytest.approx(100 / 3)
  assert scores["rougeL"] == pytest.approx(75.0)
  assert ft.postprocess_text(b" text \n") == "text"
