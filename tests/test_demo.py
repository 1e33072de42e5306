"""The demo end to end at a reduced size: data, 2-process training, held-out evaluation, export."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_demo_clears_a_bar_far_above_chance(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--quick", "--no-wandb", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((out / "report.json").read_text())
    # Chance is 50% on balanced same/different pairs of identities never seen in training.
    assert report["heldout"]["accuracy"] >= 0.80, report["heldout"]
    assert report["onnx_max_abs_diff"] < 1e-4
    assert Path(report["onnx"]).stat().st_size > 0
    assert list((out / "run" / "eval").glob("*.png")), "no ROC image"
    assert (out / "data" / "contact_sheet.png").exists()
    assert "held-out verification accuracy" in result.stdout
    # Identification: rank-1 of the held-out identities, without and with 200 rendered strangers.
    ident = report["identification"]
    assert ident["sizes"] == [0, 200] and ident["num_enrolled"] == 100 and ident["num_probes"] == 300
    assert ident["rank1"][0] >= ident["rank1"][1] and ident["rank1"][0] > 0.2, ident
    assert (out / "run" / "eval" / "rank1_vs_distractors.png").exists() and "rank-1" in result.stdout
