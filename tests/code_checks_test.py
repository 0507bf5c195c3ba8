"""code_checks: the parsing prefix and bracket balance printed with the quickstart's samples."""
from t5x_lite import code_checks


def test_the_parsing_prefix_stops_at_the_first_line_that_breaks_the_program():
  text = "def f(x):\n\n    return x\nclass :\n    pass\nprint("  # the cut last line is ignored
  lines = code_checks.complete_lines(text)
  assert lines == ["def f(x):", "", "    return x", "class :", "    pass"]
  assert code_checks.parsing_prefix(lines) == (2, 4)  # blank lines are not counted
  assert code_checks.parsing_prefix(["import os", "x = [1,", "  2]"]) == (3, 3)
  assert code_checks.parsing_prefix(["def f(:"]) == (0, 1)
  assert code_checks.parsing_prefix([]) == (0, 0)


def test_brackets_pair_by_kind_outside_strings_and_comments():
  assert code_checks.bracket_balance(["f(a[1], {2: (3)})"]) == (8, 8)
  assert code_checks.bracket_balance(["x = '(' + \"[\" # )", "y = ')'"]) == (0, 0)
  assert code_checks.bracket_balance(['s = """(', ')"""', "(]"]) == (0, 2)  # wrong kind
  assert code_checks.bracket_balance(["f(x))", "g(["]) == (2, 5)  # a stray ), two left open
  assert code_checks.bracket_balance(["s = 'it\\'s (' + (a)"]) == (2, 2)  # escaped quote


def test_a_line_parses_alone_as_a_statement_or_as_a_header_given_its_body_and_its_if():
  for line in ["    def f(self, x):", "else:", "  elif x > 1:", "except ValueError as e:",
               "finally:", "@property", "        return self.x", "import os"]:
    assert code_checks.line_parses(line), line
  for line in ["def def else:", "print(", "if  def  elif", "the value of x", "else"]:
    assert not code_checks.line_parses(line), line
  lines = ["def f():", "    # a comment: any text parses", "", "    return 1"]
  assert code_checks.lines_of_code(lines) == ["def f():", "    return 1"]


def test_the_report_has_a_note_per_sample_and_a_summary_that_counts_them_all():
  notes, summary = code_checks.python_report(["import os\nos.path(\n", "x = (1]\ny = 2\n", ""])
  assert notes == ["parses: first 1 of 2 lines; alone: 1 of 2 lines of code; brackets matched: "
                   "0 of 1",
                   "parses: first 0 of 2 lines; alone: 1 of 2 lines of code; brackets matched: "
                   "0 of 2",
                   "parses: first 0 of 0 lines; alone: 0 of 0 lines of code; brackets matched: "
                   "0 of 0"]
  assert summary == ("Python check of 3 samples (complete lines only): 0 parse in full; 1 of 4 "
                     "lines in a parsing prefix (25%); 2 of 4 lines of code parse on their own "
                     "(50%); 0 of 3 brackets matched (0%).")
  notes, summary = code_checks.python_report(["def f():\n    return (1)\n"])
  assert "1 parse in full" in summary and "4 of 4 brackets matched (100%)" in summary
