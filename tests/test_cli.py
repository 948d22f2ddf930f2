"""`loraplex demo`: runs the core end to end and reports what it did."""

import re

from loraplex.cli import main


def test_demo_finishes_every_request_and_frees_every_block(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "clashes with registered 'sql' (id 1, path /adapters/sql)" in out
    m = re.search(r"all (\d+) requests finished in \d+ steps; (\d+)/(\d+) KV blocks free", out)
    assert m is not None, out
    assert m.group(2) == m.group(3)
    steps = [line for line in out.splitlines() if line.startswith("step")]
    # max_loras=2: no step batches more than two adapters besides the base model
    for line in steps:
        labels = re.findall(r"\[(\w+) @", line)
        assert len([x for x in labels if x != "base"]) <= 2, line
    served = {int(r) for r in re.findall(r"\br(\d+)\(", out)}
    assert served == set(range(int(m.group(1))))
