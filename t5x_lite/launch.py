"""What every job (train, infer, eval) does first: flags, multi-host start-up, gin.

Flags, as T5X's: `--gin_file` (repeatable; relative paths are looked up in `--gin_search_paths`
and in gin_configs/), `--gin.NAME=VALUE` (a binding or macro, e.g. `--gin.TRAIN_STEPS=100`;
strings need no quotes), `--gin_search_paths`, and for multi-host runs `--coordinator_address`,
`--num_processes`, `--process_id`.

A flag whose value does not fit what the gin files set (`--gin.TRAIN_STEPS=ten`,
`--gin.BATCH_SIZE=8.5`) is refused before any work, naming the flag. A job's known errors (bad
config or data, a refused MODEL_DIR, a diverged run, a full disk) end it with one message on
stderr and exit status 1; T5X_LITE_TRACEBACK=1 shows their tracebacks instead.
"""
from __future__ import annotations

import argparse
import ast
import errno
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

import gin

from t5x_lite import partitioning, quiet_start

GIN_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "gin_configs")
START = time.perf_counter()  # when the job's process imported t5x_lite (first-step timing)


def _binding(flag: str) -> str:
  """`--gin.NAME=VALUE` -> "NAME = VALUE"; a VALUE that is not a Python literal or a gin
  reference (@x, %X) is taken as a string, so paths need no quoting."""
  name, sep, value = flag[len("--gin."):].partition("=")
  if not sep or not name:
    raise ValueError(f"{flag!r}: write gin flags as --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100.")
  if not value.startswith(("@", "%")):
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = repr(value)
  return f"{name} = {value}"


def parse_flags(argv: Sequence[str], prog: str = "python -m t5x_lite.train",
                description: str = __doc__) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to parse (repeatable, in order)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories to look up gin files and includes in")
  parser.add_argument("--coordinator_address", help="multi-host: HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
  parser.add_argument("--process_id", type=int, help="multi-host: this process's id")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--gin.")]
  if unknown:
    parser.error(f"unrecognized arguments: {unknown} (bindings are --gin.NAME=VALUE)")
  args.gin_bindings = [_binding(a) for a in rest]
  if not args.gin_file:
    parser.error("give at least one --gin_file, e.g. --gin_file=runs/quickstart.gin")
  return args


def configure(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings; a binding of a macro no file defines is refused (gin
  would silently accept the typo `TRAIN_STEP = 5`)."""
  gin.clear_config()
  for path in [p for entry in search_paths for p in entry.split(",") if p] + [GIN_CONFIGS]:
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)  # once: a second configure() must not repeat it
  import t5x_lite.data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  logging.disable(logging.ERROR)  # gin logs every search-path miss before the hit as an error
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
  except IOError as e:
    raise FileNotFoundError(f"{e} (searched the working directory, {GIN_CONFIGS} and "
                            "--gin_search_paths)") from e
  finally:
    logging.disable(logging.NOTSET)
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if "." not in name and "/" not in name:
      try:
        gin.query_parameter(f"%{name}")
      except ValueError:
        from t5x_lite import quantization  # pylint: disable=g-import-not-at-top
        raise ValueError(f"--gin.{name}: no gin file defines the macro {name}; " + (
            quantization.undefined_macro_hint(name) or "check the spelling (e.g. TRAIN_STEPS, "
            "BATCH_SIZE, MODEL_DIR).")) from None
    binding = _typed(binding)
    try:
      gin.parse_config(binding)
    except ValueError as e:
      raise ValueError(f"--gin.{binding}: {e}") from None
  _check_model_given()
  _use_the_checkpoints_vocabulary()


# The macros through which a job reads a params checkpoint (infer/eval; fine-tuning).
CHECKPOINT_MACROS = ("CHECKPOINT_PATH", "INITIAL_CHECKPOINT_PATH")


def _use_the_checkpoints_vocabulary() -> None:
  """A job that starts from a params checkpoint and binds no vocabulary reads text with the
  checkpoint's (a converted model's tokenizer.json, a run's SentencePiece model or its
  config.gin's `get_vocabulary`), as `t5x_lite.load` does, instead of the byte default."""
  if any(_bound(f"get_vocabulary.{arg}") is not None
         for arg in ("kind", "spm_path", "tokenizer_path")):
    return  # the run chose one; the jobs check it against the checkpoint's
  from t5x_lite import loaded_model, metrics  # pylint: disable=g-import-not-at-top  # heavy
  for macro in CHECKPOINT_MACROS:
    path = _bound(macro)
    bindings = loaded_model.checkpoint_vocabulary_bindings(path) if isinstance(
        path, str) and os.path.isdir(path) else {}
    if bindings:
      for name, value in bindings.items():
        gin.bind_parameter(f"get_vocabulary.{name}", value)
      metrics.log(f"Vocabulary: the one {macro} was trained or converted with ({bindings}).")
      return


def _bound(name: str):
  """The value the gin files bind `name` (a macro or configurable.param) to; None if unbound."""
  try:
    return gin.query_parameter(name if "." in name or "/" in name else f"%{name}")
  except ValueError:
    return None


_KINDS = ((bool, "True or False"), (int, "a whole number"), (float, "a number"),
          ((list, tuple), "a list"), (dict, "a dict"))  # bool first: it is an int to Python


def _fits(new, kind) -> bool:
  if kind in (int, float) and isinstance(new, bool):
    return False
  return isinstance(new, (int, float) if kind is float else kind)


def _typed(binding: str) -> str:
  """Refuses a flag value of another type than the gin files' value (a word or a fraction
  where a whole number goes); a number where a string goes is taken as that string."""
  name, value = (part.strip() for part in binding.split("=", 1))
  old = _bound(name)
  try:
    new = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return binding  # a gin reference (@f(), %X)
  if isinstance(old, str) and isinstance(new, (int, float)):
    return f"{name} = {value!r}"  # --gin.MODEL_DIR=2024 is the directory '2024'
  kind, words = next(((k, w) for k, w in _KINDS if isinstance(old, k)), (None, ""))
  if kind is not None and not _fits(new, kind):
    raise ValueError(f"--gin.{name} takes {words} (its value before this flag: {old!r}), not "
                     f"{new!r}; nothing was run.")
  return binding


def _check_model_given() -> None:
  """The run gins bind `train.model = %MODEL`: a model gin must define MODEL before them."""
  if _bound("MODEL") is None and "%MODEL\n" in gin.config_str():
    raise ValueError("No model: give a model gin first, then the run gin (e.g. "
                     "--gin_file=models/gpt2_tiny.gin --gin_file=runs/pretrain.gin), or a "
                     "trained run's model.gin.")


def start_job(argv: Optional[Sequence[str]] = None, prog: str = "python -m t5x_lite.train",
              description: str = __doc__) -> None:
  """Flags, multi-host start-up and gin, then the gin config is final."""
  args = parse_flags(sys.argv[1:] if argv is None else argv, prog, description)
  partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id)
  quiet_start.start_jax()
  configure(args.gin_file, args.gin_bindings, args.gin_search_paths)
  gin.finalize()


# Errors the jobs raise with a message that says what to change: reported in one message.
KNOWN_ERRORS = (ValueError, OSError, MemoryError, FloatingPointError)


def main(job: Callable[[], object], argv: Optional[Sequence[str]] = None, prog: str = "",
         description: str = __doc__) -> None:
  """A job's command line: start up, then run `job` (a gin-configurable function). A known
  error ends it with one message on stderr and status 1 (see module docstring)."""
  logging.basicConfig(level=logging.WARNING)
  try:
    start_job(argv, prog, description)
    job()
  except KNOWN_ERRORS as e:
    if os.environ.get("T5X_LITE_TRACEBACK"):
      raise
    print(f"{prog or 't5x_lite'}: error: {error_message(e)}", file=sys.stderr, flush=True)
    sys.exit(1)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def error_message(error: BaseException) -> str:
  """The message of a known error without what gin adds to it ("In call to configurable ...")
  and, for a full disk, with the fix."""
  lines = [line for line in str(error).splitlines()
           if not line.strip().startswith("In call to configurable")]
  message = "\n".join(lines).strip()
  # gin re-raises a job's error as a proxy that lacks its errno: read the original's.
  original = error.__context__ if isinstance(error.__context__, OSError) else error
  if isinstance(error, OSError) and getattr(original, "errno", None) in _DISK_FULL:
    where = f" writing {original.filename}" if original.filename else ""
    message = (f"the disk is full{where} ({message}). Free space on it, or point MODEL_DIR "
               "to a larger disk, and rerun (a run resumes from its last good checkpoint).")
  return message
