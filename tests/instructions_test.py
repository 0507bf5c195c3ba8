"""Instruction tasks: JSONL prompt/response with configurable keys (bad rows counted), the
loss on response tokens only for decoders, and the built-in offline instruction set."""
import json

import gin
import pytest

from t5x_lite import data
from t5x_lite.data import instructions, sources


def texts(batch, vocab):
  """(prompt part, response part) of row 0 of a decoder batch, split by its loss weights."""
  row, weights = batch["decoder_target_tokens"][0], batch["decoder_loss_weights"][0]
  decode = lambda ids: vocab.decode([int(t) for t in ids if t > 1])
  return decode(row[weights == 0]), decode(row[weights > 0])


def test_jsonl_with_other_keys_trains_on_responses_only_and_counts_bad_rows(tmp_path):
  rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)] + [{"question": "x"}]
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  name = instructions.register_instruction_task(
      "test_sft", str(tmp_path / "{split}.jsonl"), prompt_key="question", response_key="answer")
  sources.FAULTS.clear()
  batches = data.get_dataset(name, {"inputs": 16, "targets": 8}, batch_size=4, shuffle=False,
                             feature_converter="decoder", pack=False, num_epochs=1)
  prompt, response = texts(next(iter(batches)), data.get_vocabulary())
  assert prompt == "q0" and response == "a0"
  list(batches)  # read to the end
  assert any("1 row(s) without a prompt or response" in line and "keys found: ['question']"
             in line for line in sources.data_faults())


def test_jsonl_without_files_says_what_to_set():
  with pytest.raises(sources.CorpusError, match="instruction_files.pattern"):
    next(iter(data.get_dataset("instruction_jsonl", {"inputs": 16, "targets": 8})))


def test_the_builtin_set_asks_for_signatures_and_sums():
  gin.parse_config(["stdlib_corpus.max_files = 4"])
  vocab = data.get_vocabulary()
  for task, prompt_start, check in (
      ("instructions_signature", "Write the signature of a Python function that ",
       lambda r: r.removeprefix("async ").startswith("def ") and r.endswith(":")),
      ("instructions_addition", "What is ", lambda r: r.isdigit())):
    batch = next(iter(data.get_dataset(task, {"inputs": 128, "targets": 32}, batch_size=2,
                                       seed=0, feature_converter="decoder", pack=False)))
    prompt, response = texts(batch, vocab)
    assert prompt.startswith(prompt_start) and check(response), (prompt, response)
  assert "stdlib_instructions" in data.registered_names()
