"""benchmarks/selection_quality.py end to end on from-config tiny models (seconds): both tables, every arm,
two seeds with error bars, the reference model and the static Rho-1 caches."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_selection_quality_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("selection_quality", ROOT / "benchmarks" / "selection_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q.md"
    mod.main(["--tiny", "--seeds", "0", "1", "--sft-steps", "2", "--ref-steps", "1", "--pt-steps", "2",
              "--batch", "8", "--seq", "128", "--n-eval", "4", "--n-gen", "2", "--max-new", "4",
              "--max-samples", "80", "--pt-n-eval", "4", "--out", str(out)])
    text = out.read_text()
    for row in ("| full |", "| random k=0.6 |", "| rho1 k=0.6 (trained reference)", "| static rho1", "| sstoken",
                "| qtuning", "| eslm alpha=0.4 (loss)", "| eslm alpha=0.4 (entropy)", "| ada-eslm",
                "| base (no training)", "| init (step 0)"):
        assert row in text, row
    assert "## SFT" in text and "## Pretraining" in text and " ± " in text
    assert mod.extract("so 12 + 3 = 15\n#### 1,234") == ("1234", "1234")
    assert mod.extract("the answer is 7.0") == (None, "7")
