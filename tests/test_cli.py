"""`loraplex demo`: every output of the mixed batch is its task's right answer, so a routing
mistake (a request served by another adapter, or by none) fails here."""

from loraplex.cli import main
from loraplex.entrypoints import demo


def test_demo_outputs_are_the_right_answers():
    rows, stats = demo.run()
    assert len(rows) == len(demo.WORDS) * len(demo.TASKS) == stats["requests"]
    wrong = [r for r in rows if not r.ok]
    assert wrong == []
    # the tasks disagree on every word, so each output identifies the adapter that made it
    for word in demo.WORDS:
        answers = {r.output for r in rows if r.word == word}
        assert len(answers) == len(demo.TASKS)


def test_demo_command_prints_the_table(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "hello>       upper    HELLO" in out
    assert f"{len(demo.WORDS) * len(demo.TASKS)}/{len(demo.WORDS) * len(demo.TASKS)} outputs" in out
