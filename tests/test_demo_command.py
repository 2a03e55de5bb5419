"""`phi3v-edge demo`: exports the bundled checkpoint to INT4 once (cached), then the INT4 bundle answers the
bundled example questions as well as the PyTorch reference does on them."""
from __future__ import annotations

import json

from phi3v_edge.models import demo


def test_demo_exports_once_and_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PHI3V_EDGE_CACHE", str(tmp_path))
    assert demo.main(["--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    bundles = list(tmp_path.iterdir())
    assert len(bundles) == 1 and bundles[0].name.endswith("-int4-b64-cpu-e2")
    m = json.loads((bundles[0] / "manifest.json").read_text())
    assert m["decoder"]["precision"] == "int4"
    right, total = (int(x) for x in out.strip().splitlines()[-1].split()[0].split("/"))
    assert total == len(demo.load_questions())
    # the committed checkpoint answers all 8 with the PyTorch reference (tests/test_demo_model.py holds
    # the reference to >= 7); the INT4 bundle must do as well
    assert right >= 7
    # second run: the cached bundle is reused (no export message)
    assert demo.main(["--provider", "cpu"]) == 0
    assert "exporting" not in capsys.readouterr().out
    assert len(list(tmp_path.iterdir())) == 1
