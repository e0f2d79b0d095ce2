"""The in-memory learning probe runs the trainer's model, optimizer and schedules and reports kNN and feature rank."""
import json

from byolfast.benchmarks.learning_probe import digits, main


def test_digits_are_drawn_reproducibly_in_each_style():
    a, ya, va, yva = digits("posscale", 16)
    b, yb, _, _ = digits("posscale", 16)
    assert a.shape[1:] == (3, 16, 16) and len(a) + len(va) == 1797 and (a == b).all() and (ya == yb).all()
    assert set(yva.tolist()) == set(range(10))
    plain, _, _, _ = digits("plain", 16)
    assert not (plain == a).all()


def test_probe_writes_a_curve(tmp_path):
    out = tmp_path / "curve.json"
    curve = main(["--steps", "2", "--evals", "1", "--size", "16", "--batch", "16", "--hidden", "32",
                  "--out-dim", "8", "--json", str(out)])
    assert [c["step"] for c in curve] == [0, 2]
    assert all(0.0 <= c["knn_top1"] <= 1.0 and 1.0 <= c["feature_rank"] <= 512 for c in curve)
    assert json.loads(out.read_text())["curve"] == curve
