"""offline_plots.py: the DVC HTML template that inlines Vega. That `dvc plots show` pages render
with the network off, in a real browser, is checked on a real project in test_entrypoints.py."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from transferlab.offline_plots import TEMPLATE_FILE, main, template_html


def test_template_inlines_vega_and_leaves_dvc_only_the_plot_divs(tmp_path: Path) -> None:
    html = template_html()
    assert "{plot_divs}" in html and "{refresh_tag}" in html
    assert "{scripts}" not in html, "DVC would insert its CDN <script> tags there"
    assert not re.search(r"<script[^>]*\bsrc=", html), "every script is inline"
    for library in ("window.vegaEmbed=", "window.vega=", "window.vegaLite="):
        assert library in html


def test_dvc_is_pointed_at_the_template_make_setup_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc" / "config")
    assert REPO_ROOT / ".dvc" / config["plots"]["html_template"] == REPO_ROOT / TEMPLATE_FILE
    assert f"/{TEMPLATE_FILE}" in (REPO_ROOT / ".gitignore").read_text().splitlines(), "generated, not committed"
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    assert main([]) == 0
    assert (tmp_path / TEMPLATE_FILE).read_text() == template_html()
