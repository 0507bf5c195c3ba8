"""t5x_lite/data/preferences.py: preference tasks (built-in addition pairs, JSON Lines with bad
rows skipped and counted) and the pair converter's layout per family."""
import json

import numpy as np
import pytest

from t5x_lite import data
from t5x_lite.data import preferences, sources

LENGTHS = {"inputs": 16, "chosen": 8, "rejected": 6}


@pytest.fixture(autouse=True)
def _no_faults():
  sources.FAULTS.clear()
  yield
  sources.FAULTS.clear()


def batches(name, family, batch_size=4, split="train", lengths=LENGTHS, shuffle=True):
  return data.get_dataset(name, lengths, split=split, batch_size=batch_size, seed=0,
                          shuffle=shuffle and split == "train",
                          feature_converter=preferences.pair_feature_converter(family))


def text(ids):
  vocab = data.get_vocabulary()
  return vocab.decode([int(t) for t in ids if t > 1])


def test_addition_pairs_prefer_the_right_sum_and_reject_a_near_miss():
  batch = next(batches("addition_preferences", "encoder_decoder", batch_size=16,
                       split="validation"))
  for prompt, responses in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
    a, b = text(prompt[0]).removeprefix("add: ").split(" + ")
    chosen, rejected = int(text(responses[0])), int(text(responses[1]))
    assert chosen == int(a) + int(b)
    assert abs(chosen - rejected) in (1, 10, 100) and rejected >= 0
    np.testing.assert_array_equal(prompt[0], prompt[1])  # one prompt, two answers


def test_docstring_pairs_prefer_the_functions_own_docstring():
  batch = next(batches("docstring_preferences", "encoder_decoder", batch_size=8,
                       split="validation", lengths={"inputs": 96, "chosen": 24, "rejected": 24},
                       shuffle=False))
  assert batch["encoder_input_tokens"].shape == (8, 2, 96)
  chosen = [text(r[0]) for r in batch["decoder_target_tokens"]]
  rejected = [text(r[1]) for r in batch["decoder_target_tokens"]]
  for row in range(8):
    prompt = text(batch["encoder_input_tokens"][row, 0])
    assert prompt.startswith("docstring: def ") or prompt.startswith("docstring: async def ")
    np.testing.assert_array_equal(*batch["encoder_input_tokens"][row])  # one prompt, two answers
    assert chosen[row] and rejected[row] and chosen[row] != rejected[row]
  # In one file, each function's rejected answer is the docstring of the function before it.
  assert any(rejected[i + 1] == chosen[i] for i in range(7)), (chosen, rejected)
  assert tuple(preferences.CONVERTERS) == preferences.FAMILIES


def test_decoder_rows_hold_prompt_then_response_with_loss_on_the_response_only():
  batch = next(batches("addition_preferences", "decoder"))
  width = LENGTHS["inputs"] + LENGTHS["chosen"]
  assert {k: v.shape for k, v in batch.items()} == {
      k: (4, 2, width) for k in ("decoder_input_tokens", "decoder_target_tokens",
                                 "decoder_loss_weights", "decoder_causal_attention")}
  vocab = data.get_vocabulary()
  for row in range(4):
    for pair in range(2):
      targets = batch["decoder_target_tokens"][row, pair]
      weights = batch["decoder_loss_weights"][row, pair]
      np.testing.assert_array_equal(batch["decoder_input_tokens"][row, pair],
                                    np.concatenate([[0], targets[:-1]]))
      prompt_length = int(np.argmax(targets == vocab.eos_id)) + 1  # the prompt ends with EOS
      assert not weights[:prompt_length].any() and weights[prompt_length]
      assert targets[np.flatnonzero(weights)[-1]] == vocab.eos_id  # the response's own EOS
      assert batch["decoder_causal_attention"][row, pair].sum() == prompt_length + 1
    chosen, rejected = (text(batch["decoder_target_tokens"][row, i] *
                             batch["decoder_loss_weights"][row, i]) for i in (0, 1))
    assert chosen != rejected


def test_encoder_rows_concatenate_prompt_and_response():
  batch = next(batches("addition_preferences", "encoder", batch_size=2))
  assert batch["encoder_input_tokens"].shape == (2, 2, 24)
  assert text(batch["encoder_input_tokens"][0, 0]).startswith("add: ")
  assert not batch["encoder_loss_weights"].any()


def test_jsonl_rows_missing_a_key_or_identical_are_skipped_and_counted(tmp_path):
  rows = [{"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(6)]
  rows[1] = {"q": "question 1", "good": "same", "bad": "same"}
  rows[3] = {"q": "question 3", "good": "only chosen"}
  lines = [json.dumps(r) for r in rows] + ["not json", "[1, 2]"]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  name = preferences.register_preference_task("test_prefs", str(tmp_path / "{split}.jsonl"),
                                              "q", "good", "bad", max_bad_fraction=1.0)
  batch = next(batches(name, "encoder_decoder", batch_size=4, shuffle=False))
  kept = sorted(text(p[0]) for p in batch["encoder_input_tokens"])
  assert kept == ["question 0", "question 2", "question 4", "question 5"]
  faults = "\n".join(sources.data_faults())
  assert "1 row(s) with chosen == rejected (first at line 2" in faults, faults
  assert "1 row(s) without a preference key (first at line 4: no string at ['bad']" in faults
  assert "2 malformed record(s)" in faults


def test_wrong_keys_stop_the_run_naming_the_file_and_the_fix(tmp_path):
  rows = [{"prompt": f"p{i}", "response": "a"} for i in range(30)]
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  name = preferences.register_preference_task("test_wrong_keys",
                                              str(tmp_path / "{split}.jsonl"))
  with pytest.raises(sources.CorpusError, match=r"train.jsonl: 20 of the 2\d records .*"
                     r"preference_files.prompt_key"):
    next(batches(name, "decoder"))


def test_bad_configuration_is_refused_with_the_fix(tmp_path):
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS must have exactly"):
    batches("addition_preferences", "decoder", lengths={"inputs": 8, "targets": 8})
  with pytest.raises(ValueError, match="model family in"):
    preferences.pair_feature_converter("decoder_only")
  with pytest.raises(sources.CorpusError, match="preference_files.pattern"):
    next(batches("preference_jsonl", "decoder"))
  name = preferences.register_preference_task("test_no_files", str(tmp_path / "{split}.x"))
  with pytest.raises(sources.CorpusError, match="No files match preference_files.pattern"):
    next(batches(name, "decoder"))
