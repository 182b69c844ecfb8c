"""The selection report: after a short fit, an HTML page with highlighted kept tokens and the two PNG plots."""

from pathlib import Path

from tokensel.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


def test_report_written_every_n_steps_and_at_end(in_tmp):
    cli_main(["fit", "--config", str(ROOT / "recipes" / "qtuning.yaml"), "--config", str(TINY),
              "--trainer.logger", "false", "--trainer.max_steps", "3",
              "--model.init_args.report.init_args.every_n_steps", "2",
              "--model.init_args.report.init_args.out_dir", str(in_tmp / "rep")])
    d = in_tmp / "rep"
    for f in ("report.html", "keep_ratio.png", "score_hist.png", "history.json"):
        assert (d / f).exists() and (d / f).stat().st_size > 0, f
    assert (d / "keep_ratio.png").read_bytes()[:4] == b"\x89PNG"
    page = (d / "report.html").read_text()
    assert "QTuningSelection" in page and "class='k'" in page and "class='p'" in page  # kept + prompt tokens
    assert "rgba(255,140,0," in page  # the score tint
    import json

    hist = json.loads((d / "history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3] and all(0 < h["keep_ratio"] <= 1 for h in hist)
