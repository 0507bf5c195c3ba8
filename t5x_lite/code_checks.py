"""How much of a generated text is Python, counted rather than eyeballed.

Three measures per sample, all over its complete lines (generation stops mid-line, so what
follows the last newline is left out):
- the longest prefix of lines that `ast.parse` accepts (non-blank lines counted),
- the lines of code that parse on their own (a statement, or a block's header given a body),
  which still counts the good lines after the first bad one; comments and blank lines aside,
  since any text after a `#` parses, and
- the brackets outside strings and comments that pair with an opener of the same kind.

The quickstart prints both for every sample (`print_samples.check = @python_report`).
"""
from __future__ import annotations

import ast
from typing import Sequence

import gin

_OPENER_OF = {")": "(", "]": "[", "}": "{"}


def complete_lines(text: str) -> list[str]:
  """The lines of `text` that end with a newline (the cut last line is left out)."""
  return text.split("\n")[:-1]


def parsing_prefix(lines: Sequence[str]) -> tuple[int, int]:
  """(n, total): the longest prefix of `lines` that parses holds n of their `total` non-blank
  lines."""
  total = sum(1 for line in lines if line.strip())
  for end in range(len(lines), 0, -1):
    try:
      ast.parse("\n".join(lines[:end]))
    except (SyntaxError, ValueError):  # ValueError: a null byte
      continue
    return sum(1 for line in lines[:end] if line.strip()), total
  return 0, total


# What a line needs around it to parse alone: a body after a block's header, the `if` or `try`
# an `else:` / `except:` continues, the function a decorator decorates.
_CONTEXTS = ("{}", "{} pass", "if 1: pass\n{} pass", "try: pass\n{} pass", "{}\ndef f(): pass")


def line_parses(line: str) -> bool:
  """Whether one line, dedented, is a statement or a block's header in some context."""
  code = line.strip()
  for context in _CONTEXTS:
    try:
      ast.parse(context.format(code))
    except (SyntaxError, ValueError):
      continue
    return True
  return False


def lines_of_code(lines: Sequence[str]) -> list[str]:
  """The lines that are neither blank nor only a comment."""
  return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def bracket_balance(lines: Sequence[str]) -> tuple[int, int]:
  """(matched, total) brackets of `lines` outside strings and comments. A closer is matched
  when the innermost open bracket is its kind (both then count as matched); a closer with
  none, a closer of the wrong kind and an opener left open are not."""
  matched, unmatched, stack = 0, 0, []
  quote = None  # the delimiter of the string we are in: ', ", ''' or """
  for line in lines:
    i = 0
    while i < len(line):
      if quote:
        if line[i] == "\\":
          i += 2
          continue
        if line.startswith(quote, i):
          i, quote = i + len(quote), None
          continue
      elif line[i] == "#":
        break
      elif line[i] in "'\"":
        quote = line[i] * 3 if line.startswith(line[i] * 3, i) else line[i]
        i += len(quote)
        continue
      elif line[i] in "([{":
        stack.append(line[i])
      elif line[i] in _OPENER_OF:
        if stack and stack[-1] == _OPENER_OF[line[i]]:
          stack.pop()
          matched += 2
        else:
          unmatched += 1
      i += 1
    if quote and len(quote) == 1:
      quote = None  # a one-quote string ends at the line's end (unterminated)
  return matched, matched + unmatched + len(stack)


@gin.configurable(module="t5x_lite.code_checks")
def python_report(texts: Sequence[str]) -> tuple[list[str], str]:
  """A note per text (its parsing prefix and bracket balance) and a summary over all."""
  # parsing lines, lines, matched, brackets, parse in full, code lines parsing alone, code lines
  notes, sums = [], [0] * 7
  for text in texts:
    lines = complete_lines(text)
    (parsed, total), (matched, brackets) = parsing_prefix(lines), bracket_balance(lines)
    code = lines_of_code(lines)
    alone = sum(map(line_parses, code))
    sums = [s + v for s, v in zip(sums, (parsed, total, matched, brackets,
                                         int(total > 0 and parsed == total), alone, len(code)))]
    notes.append(f"parses: first {parsed} of {total} lines; alone: {alone} of {len(code)} "
                 f"lines of code; brackets matched: {matched} of {brackets}")
  summary = (f"Python check of {len(texts)} samples (complete lines only): {sums[4]} parse in "
             f"full; {sums[0]} of {sums[1]} lines in a parsing prefix ({_percent(*sums[:2])}); "
             f"{sums[5]} of {sums[6]} lines of code parse on their own ({_percent(*sums[5:7])}); "
             f"{sums[2]} of {sums[3]} brackets matched ({_percent(*sums[2:4])}).")
  return notes, summary


def _percent(part: int, whole: int) -> str:
  return f"{100 * part / whole:.0f}%" if whole else "n/a"
