"""Progress bars in logs: when stderr is not a terminal, plain lines that advance, not a carriage-return line."""
import io
import re

from gatelab.config import Routing
from gatelab.data import TokenData
from gatelab.diagnostics.evaluate import perplexity
from gatelab.model import GPT
from gatelab.progress import progress_bar
from tests.conftest import tiny_model_config


def test_evaluation_progress_advances_in_logs(token_corpus, capsys, monkeypatch):
    """stderr is captured here (not a terminal): the evaluation bar prints a plain line per interval (0 s here) and
    its final state, instead of one carriage-return line rewritten every 30 s and cleared at the end."""
    monkeypatch.setenv("GATELAB_PROGRESS_SECONDS", "0")
    capsys.readouterr()
    perplexity(GPT(tiny_model_config()), TokenData(token_corpus, "validation"), Routing(), batch_size=1,
               max_tokens=200, progress=True, desc="dense")
    err = capsys.readouterr().err
    assert "\r" not in err
    counts = [tuple(map(int, m)) for m in re.findall(r"dense: *\d+%\|.*?\| *(\d+)/(\d+) \[", err)]
    assert counts == [(i, 7) for i in range(8)], err  # 6 full 32-token chunks and a short one: 0/7 ... 7/7


def test_progress_lines_are_rate_limited_but_always_end(monkeypatch):
    monkeypatch.delenv("GATELAB_PROGRESS_SECONDS", raising=False)
    log = io.StringIO()
    bar = progress_bar(total=1000, file=log, desc="eval", leave=False)
    assert bar.mininterval == 10.0
    for _ in range(1000):
        bar.set_postfix_str("x", refresh=True)  # forced redraws do not flood a log
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0/1000" in lines[0] and "1000/1000" in lines[1], lines
