#!/usr/bin/env python3
"""Train a SentencePiece vocabulary for t5x_lite from local text.

    python tools/train_vocab.py --stdlib --vocab_size 8000 --output_prefix /tmp/spm
    python tools/train_vocab.py --input '/data/corpus/train-*.jsonl' --vocab_size 32000 \
        --model_type bpe --output_prefix /data/spm32k

The model follows seqio/T5 conventions: pad=0, eos=1, unk=2, no BOS, and a "[MASK]" piece (id 3)
for BERT MLM; byte fallback so no text is ever unknown; whitespace kept as is (code needs its
indentation). T5 sentinels (<extra_id_0> ...) are not stored in the file: seqio appends
`extra_ids` of them when loading it, which is what `get_vocabulary.extra_ids` controls.
At the end it prints the gin bindings that select the new vocabulary.

`--kind bpe|wordpiece|unigram` trains a Hugging Face `tokenizers` tokenizer instead (byte-level
BPE as GPT-2's, WordPiece as BERT's, or Unigram over bytes) and writes `<output_prefix>/`
tokenizer.json with the same ids for pad/eos/unk/[MASK] and the sentinels stored in it:

    python tools/train_vocab.py --stdlib --kind bpe --vocab_size 8000 --output_prefix /tmp/bpe
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from typing import Iterator, Sequence

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5x_lite.data import sources  # noqa: E402  pylint: disable=g-import-not-at-top
from t5x_lite import hf_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top
from t5x_lite.data import vocabularies  # noqa: E402  pylint: disable=g-import-not-at-top


def iter_documents(config: sources.CorpusConfig, split: str = "train") -> Iterator[str]:
  """Documents of a corpus, read in Python (same file listing and UTF-8 rules as the tasks)."""
  import json  # pylint: disable=g-import-not-at-top
  for path in sources.list_corpus(config, split).files:
    fmt = config.resolved_format(path)
    with open(path, encoding="utf-8") as f:
      if fmt == "files":
        yield f.read()
        continue
      for line in f:
        if fmt == "jsonl":
          line = json.loads(line).get(config.text_key) if line.strip() else ""
        if line and line.strip():
          yield line


def iter_sentences(documents: Iterator[str], max_sentence_bytes: int,
                   progress: bool = True, lines_per_sentence: int = 1) -> Iterator[str]:
  """SentencePiece trains on sentences: by default each non-empty line of the documents, with a
  progress bar. With `lines_per_sentence` > 1, runs of that many lines, each ending with its
  newline (blank lines kept): the model then learns pieces for newlines (`):\n`, `\n\n`) and
  indentation, which code is full of, instead of spelling each newline as a byte.
  Sentences over `max_sentence_bytes` are left out."""
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(unit=" sentences", desc="reading text", file=sys.stderr, mininterval=0.5)
  for doc in documents:
    lines = doc.splitlines()
    if lines_per_sentence > 1:
      lines = ["".join(line + "\n" for line in lines[i:i + lines_per_sentence])
               for i in range(0, len(lines), lines_per_sentence)]
    for line in lines:
      if line.strip() and len(line.encode("utf-8")) <= max_sentence_bytes:
        if bar is not None:
          bar.update()
        yield line
  if bar is not None:
    bar.close()


def train(config: sources.CorpusConfig, output_prefix: str, vocab_size: int = 8000,
          model_type: str = "unigram", max_sentences: int = 2_000_000,
          character_coverage: float = 0.9995, max_sentence_bytes: int = 4192,
          progress: bool = True, quiet: bool = False, lines_per_sentence: int = 1,
          split_by_unicode_script: bool = True, max_piece_length: int = 16,
          dummy_prefix: bool | None = None) -> str:
  """Trains and writes `<output_prefix>.model` (and `.vocab`); returns the model path.
  `split_by_unicode_script=False` lets a piece join letters with `_` and digits (`__init__`,
  `self._x`), which SentencePiece otherwise splits as different scripts. `dummy_prefix` (default:
  only when training line by line) puts a space before each sentence; a pipeline encodes whole
  documents, whose inner lines follow a newline with no such space, so with it the pieces learned
  for indentation (one space more than any indent) and line-start words (`▁def`) rarely fit."""
  if dummy_prefix is None:
    dummy_prefix = lines_per_sentence == 1
  if os.path.dirname(output_prefix):
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, "identity.tsv")
    with open(rules, "w") as f:
      f.write(IDENTITY_RULE)
    sentences = iter_sentences(iter_documents(config), max_sentence_bytes, progress,
                               lines_per_sentence)
    _train(sentences, output_prefix, vocab_size, model_type, max_sentences, character_coverage,
           max_sentence_bytes, quiet, rules, dummy_prefix=dummy_prefix,
           split_by_unicode_script=split_by_unicode_script, max_piece_length=max_piece_length)
  return output_prefix + ".model"


# Text is kept exactly (code needs it), but with SentencePiece's "identity" rule the model has
# no character map, and TF-Text's op then logs "precompiled_charsmap is empty" each time a
# pipeline loads it. One rule on a Unicode noncharacter (never in text) gives it a map.
IDENTITY_RULE = "FDD0\tFDD1\n"


def _train(sentences, output_prefix, vocab_size, model_type, max_sentences, character_coverage,
           max_sentence_bytes, quiet, rules, dummy_prefix=True, split_by_unicode_script=True,
           max_piece_length=16):
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences,
      model_prefix=output_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=max_sentences,  # SentencePiece samples this many lines at most
      shuffle_input_sentence=True,
      max_sentence_length=max_sentence_bytes,
      pad_id=vocabularies.PAD_ID, eos_id=vocabularies.EOS_ID, unk_id=2, bos_id=-1,
      user_defined_symbols=[vocabularies.MASK_PIECE],
      byte_fallback=True,
      split_digits=True,  # one piece per digit: arithmetic (the `addition` task) stays learnable
      normalization_rule_tsv=rules,
      remove_extra_whitespaces=False,
      # Trained on runs of lines, a text's start tokenizes as any line's start (no space put
      # before it): a prompt "def" reads as the model saw "def" begin a line.
      add_dummy_prefix=dummy_prefix,
      allow_whitespace_only_pieces=True,
      split_by_unicode_script=split_by_unicode_script,
      max_sentencepiece_length=max_piece_length,
      num_threads=os.cpu_count() or 1,
      minloglevel=2 if quiet else 0,  # SentencePiece's own training log is its progress display
  )


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", nargs="+", help="glob pattern(s) of text / JSONL files")
  source.add_argument("--stdlib", action="store_true",
                      help="train on the embedded Python standard-library corpus")
  parser.add_argument("--exclude", nargs="+", default=[],
                      help="with --stdlib: path substrings to leave out, as the task's "
                           "stdlib_corpus.exclude (e.g. /test/ /encodings/)")
  parser.add_argument("--format", default="auto", choices=sources.FORMATS,
                      help="lines: a document per line; files: a document per file; jsonl")
  parser.add_argument("--text_key", default="text", help="JSONL field holding the text")
  parser.add_argument("--non_utf8", default="skip", choices=("skip", "fail"))
  parser.add_argument("--output_prefix", required=True,
                      help="writes <prefix>.model/.vocab (--kind sentencepiece) or "
                           "<prefix>/tokenizer.json (the other kinds)")
  parser.add_argument("--kind", default="sentencepiece",
                      choices=("sentencepiece",) + hf_tokenizer.TRAINABLE,
                      help="SentencePiece (--model_type) or a Hugging Face tokenizers model")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  parser.add_argument("--max_sentences", type=int, default=2_000_000)
  parser.add_argument("--lines_per_sentence", type=int, default=1,
                      help="train on runs of this many lines with their newlines (code: "
                           "pieces for newlines and indentation); 1: line by line")
  parser.add_argument("--character_coverage", type=float, default=0.9995)
  parser.add_argument("--no_split_by_unicode_script", action="store_true",
                      help="SentencePiece: let pieces mix letters, digits and punctuation such "
                           "as `_` (code identifiers: `__init__`, `self._x`)")
  parser.add_argument("--no_dummy_prefix", action="store_true",
                      help="SentencePiece: no space put before each line (pieces match a "
                           "document's inner lines, which follow a newline)")
  parser.add_argument("--max_piece_length", type=int, default=16,
                      help="SentencePiece: longest piece in characters")
  parser.add_argument("--extra_ids", type=int, default=vocabularies.DEFAULT_EXTRA_IDS,
                      help="T5 sentinels seqio appends at load time (only for the printed "
                           "hint); stored in the tokenizer.json of the other kinds")
  parser.add_argument("--quiet", action="store_true", help="no progress output")
  args = parser.parse_args(argv)
  if args.lines_per_sentence < 1:
    parser.error(f"--lines_per_sentence must be at least 1, got {args.lines_per_sentence}")
  if args.max_piece_length < 1:
    parser.error(f"--max_piece_length must be at least 1, got {args.max_piece_length}")

  if args.stdlib:
    config = sources.stdlib_corpus(non_utf8=args.non_utf8, exclude=args.exclude)
  else:
    if args.exclude:
      parser.error("--exclude applies to --stdlib; leave files out of --input's globs instead")
    config = sources.CorpusConfig(patterns=tuple(args.input), format=args.format,
                                  text_key=args.text_key, non_utf8=args.non_utf8,
                                  validation_percent=0.0)  # use all the text
  if args.kind != "sentencepiece":
    return _train_tokenizers(args, config)
  path = train(config, args.output_prefix, args.vocab_size, args.model_type, args.max_sentences,
               args.character_coverage, progress=not args.quiet, quiet=args.quiet,
               lines_per_sentence=args.lines_per_sentence,
               split_by_unicode_script=not args.no_split_by_unicode_script,
               max_piece_length=args.max_piece_length,
               dummy_prefix=False if args.no_dummy_prefix else None)
  size = spm.SentencePieceProcessor(model_file=path).get_piece_size() + args.extra_ids
  print(f"\nWrote {path} ({size} ids with {args.extra_ids} sentinels; [MASK] = "
        f"{spm.SentencePieceProcessor(model_file=path).piece_to_id(vocabularies.MASK_PIECE)}).\n"
        "Use it with:\n"
        f"  --gin.get_vocabulary.kind=\"'sentencepiece'\" "
        f"--gin.get_vocabulary.spm_path=\"'{os.path.abspath(path)}'\" "
        f"--gin.get_vocabulary.extra_ids={args.extra_ids} "
        f"--gin.TransformerConfig.vocab_size={size}")
  return path


def _train_tokenizers(args: argparse.Namespace, config: sources.CorpusConfig) -> str:
  sentences = itertools.islice(
      iter_sentences(iter_documents(config), 4192, not args.quiet, args.lines_per_sentence),
      args.max_sentences)
  path = hf_tokenizer.train_tokenizer(args.kind, sentences, args.vocab_size, args.output_prefix,
                                      args.extra_ids)
  size = hf_tokenizer.HfTokenizerVocabulary(path).vocab_size
  print(f"\nWrote {path} ({args.kind}, {size} ids with {args.extra_ids} sentinels; pad 0, eos 1, "
        "unk 2, [MASK] 3).\nUse it with:\n"
        "  --gin.get_vocabulary.kind=\"'hf_tokenizer'\" "
        f"--gin.get_vocabulary.tokenizer_path=\"'{os.path.abspath(path)}'\" "
        f"--gin.TransformerConfig.vocab_size={size}")
  return path


if __name__ == "__main__":
  main()
