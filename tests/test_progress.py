"""Progress bars: redrawn on a terminal, whole lines at an interval in a log file."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from distillery.models.progress import INTERVAL_ENV, LineBar, progress_bar

pytestmark = pytest.mark.unit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_at_an_interval_and_the_final_count(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    log = io.StringIO()
    bar = progress_bar(range(1000), desc="student epoch 1/4", file=log, leave=False)
    assert isinstance(bar, LineBar)
    for _ in bar:
        bar.set_postfix(loss="0.1234")  # asks for a redraw on every step
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2  # the start, then the end (the interval never came)
    assert lines[-1].startswith("student epoch 1/4: 100%") and "1000/1000" in lines[-1] and "loss=0.1234" in lines[-1]


def test_every_interval_a_line_with_rate_and_eta_and_a_terminal_gets_tqdm(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    log = io.StringIO()
    with progress_bar(total=4, desc="label shard 0", file=log, mininterval=0) as bar:
        for _ in range(4):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 4 and "\r" not in log.getvalue() and "4/4" in lines[-1] and "it/s" in lines[-1]
    screen = Terminal()
    bar = progress_bar(range(3), file=screen)
    assert not isinstance(bar, LineBar) and isinstance(bar, tqdm)
    list(bar)
    assert "\r" in screen.getvalue()  # redrawn in place
