"""Tests of the helpers in alignjax.testing that other tests stand on."""

import pytest

from alignjax import testing


def test_result_lines_are_decoded_even_when_a_native_library_writes_onto_them(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(
      "import sys\n"
      "rank = int(sys.argv[1])\n"
      # What Gloo did in a CI run: its message landed between the JSON and the newline.
      "sys.stdout.write('noise\\nRESULT {\"rank\": %d}[Gloo] Rank 0 is connected\\n' % rank)\n"
  )
  assert testing.run_local_processes(script, [(0,), (1,)], timeout=60) == [
      {"rank": 0},
      {"rank": 1},
  ]


def test_a_child_without_a_result_line_fails_with_its_output(tmp_path):
  script = tmp_path / "child.py"
  script.write_text("print('only this')\n")
  with pytest.raises(AssertionError, match="(?s)no RESULT line.*only this"):
    testing.run_local_processes(script, [()], timeout=60)
