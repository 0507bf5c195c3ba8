"""t5x_lite/data/preprocessors.py: each objective's statistics on a fixed seed, and exactness."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import preprocessors, vocabularies

VOCAB = seqio.ByteVocabulary(extra_ids=101)  # the default byte vocabulary, spelled out
IDS = vocabularies.special_ids(VOCAB)
FEATURES = {k: seqio.Feature(VOCAB) for k in ("inputs", "targets")}
RNG = np.random.default_rng(0)
# Printable ASCII documents of varied length: bytes 32..126 -> ids 35..129.
DOCS = ["".join(map(chr, RNG.integers(32, 127, RNG.integers(1, 700)))) for _ in range(60)]


def text_ds(docs=DOCS):
  return tf.data.Dataset.from_tensor_slices({"text": docs})


def stream(docs=DOCS):
  """The token stream concat_and_split cuts: every document followed by EOS."""
  return np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8) + 3, 1) for d in docs])


def run(preprocessor, lengths, seed=0, docs=DOCS, **kwargs):
  with seqio.map_seed_manager(seed):
    ds = preprocessor(text_ds(docs), sequence_length=lengths, output_features=FEATURES, **kwargs)
  return list(ds.as_numpy_iterator())


def test_concat_and_split_cuts_the_stream_without_losing_tokens():
  ds = preprocessors.concat_and_split(preprocessors.tokenize_text(text_ds(), VOCAB), 37)
  chunks = [ex["tokens"] for ex in ds.as_numpy_iterator()]
  assert all(len(c) == 37 for c in chunks)
  full = stream()
  assert len(chunks) == len(full) // 37
  np.testing.assert_array_equal(np.concatenate(chunks), full[:len(chunks) * 37])


def test_causal_lm_makes_full_length_targets():
  out = run(preprocessors.causal_lm, {"targets": 64})
  assert [list(ex) for ex in out[:1]] == [["targets"]]
  assert all(ex["targets"].shape == (64,) for ex in out)
  np.testing.assert_array_equal(np.concatenate([ex["targets"] for ex in out]),
                                stream()[:64 * len(out)])


def test_prefix_lm_splits_at_random_points_within_both_lengths():
  len_in, len_tgt = 40, 24
  total = preprocessors.prefix_lm_chunk_length(len_in, len_tgt)
  out = run(preprocessors.prefix_lm, {"inputs": len_in, "targets": len_tgt})
  prefix_sizes = []
  for ex in out:
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS on both sides
    assert len(ex["inputs"]) <= len_in and len(ex["targets"]) <= len_tgt
    assert len(ex["inputs"]) + len(ex["targets"]) == total + 2
    prefix_sizes.append(len(ex["inputs"]) - 1)
  rebuilt = np.concatenate([np.concatenate([ex["inputs"][:-1], ex["targets"][:-1]]) for ex in out])
  np.testing.assert_array_equal(rebuilt, stream()[:total * len(out)])
  lo, hi = max(1, total - len_tgt + 1), min(len_in - 1, total - 1)
  assert min(prefix_sizes) >= lo and max(prefix_sizes) <= hi
  # Uniform over [lo, hi]: mean near the middle and real spread.
  assert abs(np.mean(prefix_sizes) - (lo + hi) / 2) < 0.15 * (hi - lo)
  assert np.std(prefix_sizes) > 0.2 * (hi - lo)


def test_span_corruption_lengths_match_t5_and_refuse_impossible_settings():
  assert preprocessors.span_corruption_lengths(512) == (568, 114)  # T5's published numbers
  with pytest.raises(ValueError, match=r"'targets': 114"):
    preprocessors.span_corruption_lengths(512, targets_length=100)
  with pytest.raises(ValueError, match="at least 4"):
    preprocessors.span_corruption_lengths(3)
  with pytest.raises(ValueError, match="sentinels"):
    preprocessors.span_corruption_lengths(4096, num_sentinels=100)


def test_span_corruption_statistics_and_exact_reconstruction():
  len_in = 128
  raw, len_tgt = preprocessors.span_corruption_lengths(len_in)
  out = run(preprocessors.span_corruption, {"inputs": len_in, "targets": len_tgt})
  chunks = stream()[:raw * len(out)].reshape(len(out), raw)
  noise_tokens = spans = 0
  span_lengths = []
  for ex, chunk in zip(out, chunks):
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    assert len(ex["inputs"]) <= len_in and len(ex["targets"]) <= len_tgt
    sentinel = lambda x: x >= IDS.sentinel(IDS.num_sentinels - 1)
    k = int(sentinel(inputs).sum())
    # Sentinels count down from the top of the vocabulary, in the same order on both sides.
    expected = [IDS.sentinel(i) for i in range(k)]
    assert inputs[sentinel(inputs)].tolist() == expected == targets[sentinel(targets)].tolist()
    # Put each span back where its sentinel is: the original chunk comes out.
    pieces = np.split(targets, np.flatnonzero(sentinel(targets)))[1:]
    rebuilt = np.concatenate([[t] if not sentinel(t) else pieces[IDS.sentinel(0) - t][1:]
                              for t in inputs])
    np.testing.assert_array_equal(rebuilt, chunk)
    span_lengths += [len(p) - 1 for p in pieces]
    noise_tokens += len(targets) - k
    spans += k
  assert noise_tokens / (raw * len(out)) == pytest.approx(0.15, abs=0.01)
  assert noise_tokens / spans == pytest.approx(3.0, abs=0.3)
  assert min(span_lengths) == 1 and max(span_lengths) >= 7  # random lengths, not all 3


def test_span_corruption_is_reproducible_with_a_seed():
  lengths = {"inputs": 64, "targets": 20}
  a, b, c = (run(preprocessors.span_corruption, lengths, seed=s) for s in (3, 3, 4))
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_mlm_chooses_15_percent_and_corrupts_80_10_10():
  length, docs = 256, DOCS * 3
  out = run(preprocessors.mlm, {"inputs": length, "targets": length}, docs=docs)
  inputs = np.stack([ex["inputs"] for ex in out])
  targets = np.stack([ex["targets"] for ex in out])
  chosen = np.stack([ex["mlm_weights"] for ex in out]) == 2
  assert set(np.unique(np.stack([ex["mlm_weights"] for ex in out]))) <= {1, 2}
  # Targets are the original text: the stream, EOS-terminated chunks of length-1 tokens.
  np.testing.assert_array_equal(targets[:, :-1].ravel(), stream(docs)[:(length - 1) * len(out)])
  assert (targets[:, -1] == 1).all()
  regular = (targets >= IDS.regular_start) & (targets < IDS.regular_end)
  assert not chosen[~regular].any()  # EOS (and any special token) is never chosen
  assert chosen.sum() / regular.sum() == pytest.approx(0.15, abs=0.002)  # exact count per row
  assert (inputs[~chosen] == targets[~chosen]).all()  # unchosen tokens untouched
  masked = inputs[chosen] == IDS.mask_id
  kept = inputs[chosen] == targets[chosen]
  replaced = ~masked & ~kept
  n = chosen.sum()
  assert n > 9000
  assert masked.sum() / n == pytest.approx(0.8, abs=0.02)
  # A random replacement equals the original 1 time in 256 (byte ids); it then counts as kept.
  assert replaced.sum() / n == pytest.approx(0.1 * 255 / 256, abs=0.015)
  assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 256, abs=0.015)
  random_ids = inputs[chosen][replaced]
  assert random_ids.min() >= IDS.regular_start and random_ids.max() < IDS.regular_end
  assert len(np.unique(random_ids)) > 100  # drawn from the whole byte range, not the text's


def test_mlm_needs_aligned_lengths_and_a_mask_id():
  with pytest.raises(ValueError, match="aligned"):
    run(preprocessors.mlm, {"inputs": 32, "targets": 16})
  with pytest.raises(ValueError, match="needs task_feature_lengths"):
    run(preprocessors.mlm, None)


def test_text_to_text_adds_the_prefix_and_keeps_pretokenized_copies():
  ds = tf.data.Dataset.from_tensor_slices({"q": ["1 + 2"], "a": ["3"]})
  ds = preprocessors.text_to_text(ds, "add: ", "q", "a")
  ds = preprocessors.tokenize_and_append_eos(ds, FEATURES, {"inputs": 8, "targets": 8})
  (ex,) = list(ds.as_numpy_iterator())
  assert ex["inputs_pretokenized"] == b"add: 1 + 2"
  assert VOCAB.decode(ex["inputs"].tolist()) == "add: 1 "  # trimmed to 8 with EOS kept last
  assert ex["inputs"][-1] == 1 and len(ex["inputs"]) == 8
  assert ex["targets"].tolist() == VOCAB.encode("3") + [1]


def test_objective_lookup():
  assert preprocessors.objective("clm") is preprocessors.causal_lm
  assert preprocessors.objective("span_corruption", noise_density=0.3).keywords == {
      "noise_density": 0.3}
  with pytest.raises(ValueError, match="Unknown objective 'bert'"):
    preprocessors.objective("bert")


def test_long_documents_are_tokenized_in_pieces_with_the_same_token_stream():
  docs = ["short one", "word " * 300 + "é" * 700 + "ü€😀" * 100, "x" * 2500]  # spaces, 2-4 byte chars
  split = preprocessors.split_long_documents(text_ds(docs), max_bytes=1000)
  pieces = list(split.as_numpy_iterator())
  assert all(len(p["text"]) <= 1003 for p in pieces) and len(pieces) > len(docs)
  assert [p["text"].decode() for p in pieces]  # every piece is whole UTF-8 characters
  assert [p["ends_document"] for p in pieces].count(True) == len(docs)
  assert b"".join(p["text"] for p in pieces) == "".join(docs).encode()
  ds = preprocessors.concat_and_split(
      preprocessors.tokenize_text(text_ds(docs), VOCAB, max_document_bytes=1000), 37)
  chunks = np.concatenate([ex["tokens"] for ex in ds.as_numpy_iterator()])
  np.testing.assert_array_equal(chunks, stream(docs)[:len(chunks)])  # EOS only at documents' ends
