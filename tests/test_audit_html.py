"""`audit --html`: a self-contained report (tables, findings, inline heatmaps), checked as files and in headless Chromium."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from audit_models import run_cli
from conftest import missing_tool
from onnx import numpy_helper

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tiny_repository, tiny_run_dir, tmp_path_factory):
    """The HTML report of our tiny LSTM with its checkpoint, against a copy whose layer1 forget R was retrained."""
    tmp = tmp_path_factory.mktemp("html")
    new = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    model = onnx.load(str(new))
    init = next(i for i in model.graph.initializer if i.name == "layer1.R")
    r = numpy_helper.to_array(init).copy()
    r[0, 16:24] -= 0.05  # rows of the forget gate in ONNX's i, o, f, c order (hidden 8)
    init.CopyFrom(numpy_helper.from_array(r, "layer1.R"))
    old = tmp / "old.onnx"
    onnx.save(model, str(old))
    out = tmp / "report.html"
    proc = run_cli("audit", str(new), "--checkpoint", str(tiny_run_dir), "--against", str(old), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)]


def test_html_report_is_self_contained_with_tables_findings_and_heatmaps(report):
    import matplotlib.image

    text = report.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(?!data:)", text), "every resource must be inline"
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    assert "CHANGED_GATES" in text and "layer1.forward: 1 tensor(s) differ" in text
    assert text.count('<table class="gates">') == 2 and '<table class="head">' in text and '<table class="against">' in text
    assert 'class="status-changed">changed<' in text
    images = _images(text)
    # Per layer (2) and direction (1): the weights, the change from init, the change from the old model.
    assert len(images) == 6 and text.count("change from init") == 2 and text.count("change from old.onnx") == 2
    for png in images:
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")  # decodes: a real PNG
        assert pixels.shape[0] > 50 and pixels.shape[1] > 200


def _chromium(*args: str, tmp) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        missing_tool("chromium is not installed (apt-get install chromium); .ci/run installs it")
    # A copy with a probe appended: after load, it writes into the DOM how many images really decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length;"
        "document.body.dataset.tables = document.querySelectorAll('table').length;"
        "document.body.dataset.findings = document.querySelectorAll('table.findings tbody tr').length; });</script></body>")),
        encoding="utf-8")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-decoded="6/6"' in body, body
    tables = int(re.search(r'data-tables="(\d+)"', body).group(1))
    findings = int(re.search(r'data-findings="(\d+)"', body).group(1))
    assert tables >= 5 and findings >= 1
    shot = tmp_path / "report.png"
    run = _chromium("--window-size=1400,2400", f"--screenshot={shot}", report.as_uri(), tmp=tmp_path)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1400)
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 100  # not a blank page
    if os.environ.get("LSTM_ONNX_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["LSTM_ONNX_KEEP_SCREENSHOT"])
