"""`byol demo --quick`: the main job end to end on the embedded digits (a few steps), and its verdict line."""
import json

from byolfast.train.demo import run_demo, verdict


def test_verdict_says_which_side_of_random_init_byol_is():
    assert "beat the random network's by 14.0 points" in verdict(0.19, 0.33, 1000)
    assert "not learned yet" in verdict(0.19, 0.13, 176) and "6.0 points below" in verdict(0.19, 0.13, 176)


def test_quick_demo_writes_its_summary_and_prints_a_verdict(tmp_path, capsys):
    summary = run_demo(out=str(tmp_path / "demo"), quick=True, data_root=str(tmp_path / "data"),
                       extra=("train.batch_size=32", "eval.k=[5]", "data.num_workers=0"))
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == 6
    for key in ("knn_top1_random_init", "knn_top1_byol", "knn_top1_byol_start"):
        assert 0.0 <= written[key] <= 1.0
    assert 1.0 <= written["knn_byol"]["feature_rank"] <= 512
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "verdict" in out and "feature rank" in out
