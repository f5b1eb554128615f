"""bench.stages builds the runs the issue asks for and reports them in its JSON shape: each
row's rule and recipe, fixed even cuts, one out_dir per run, and rows/targets from the runs."""

from __future__ import annotations

from bench.stages import parse, plan, rows, targets


def test_the_plan_trains_each_row_with_its_rule_cut_and_own_folder() -> None:
    args = parse(["--json", "/tmp/unused.json", "--lr", "decoupled=0.002"])
    todo = plan(args, "default", [0, 1])
    got = {(row, k): cfg for _, row, k, _, seed, cfg in todo if seed == 0}
    assert sorted(got) == [
        ("backprop", 1),
        ("chained", 1),
        ("decoupled", 2),
        ("decoupled", 3),
        ("decoupled", 4),
    ]
    assert got["backprop", 1].rule.label == "backprop"
    assert got["chained", 1].rule.label == "rec_lra" and got["chained", 1].rule.topology == "mirror"
    for k, cut in ((2, (3,)), (3, (2, 3)), (4, (1, 2, 3))):
        cfg = got["decoupled", k]
        assert cfg.rule.topology == "decoupled" and cfg.rule.aux_head == "conv2"
        assert cfg.pipeline.stages == k and cfg.pipeline.boundaries == cut
        assert cfg.pipeline.backend == "local" and cfg.optim.lr == 0.002  # --lr wins
    assert all(c.data.train_size == 20_000 and c.train.epochs == 4 for c in got.values())
    assert len({cfg.train.out_dir for *_, cfg in todo}) == len(todo) == 10
    deep = plan(args, "depth", [0])
    assert {cfg.model.name for *_, cfg in deep} == {"resnet18"}
    assert [cfg.pipeline.boundaries for *_, cfg in deep][2:] == [(5,), (3, 6), (3, 5, 7)]


def test_rows_and_targets_come_from_the_runs() -> None:
    args = parse(["--json", "/tmp/unused.json"])
    todo = plan(args, "default", [0, 1])
    acc = {"backprop": 0.90, "chained": 0.91, "decoupled": 0.895}
    outs = [
        {
            "test_acc": acc[row] - 0.01 * (k - 1) + 0.002 * seed,
            "epochs": [{"val_acc": 0.8, "test_acc": 0.8}],
            "train_seconds": 1.0,
            "exit_test_acc": [0.7] * (k - 1) + [acc[row]] if row == "decoupled" else None,
        }
        for _, row, k, _, seed, _ in todo
    ]
    got = rows(todo, outs)
    assert set(got) == {"backprop", "chained", "decoupled"} and set(got["decoupled"]) == {
        "2",
        "3",
        "4",
    }
    cell = got["decoupled"]["4"]
    assert abs(cell["test_acc_mean"] - (0.895 - 0.03 + 0.001)) < 1e-12
    assert cell["test_acc_per_seed"] == [0.865, 0.867] and cell["boundaries"] == [1, 2, 3]
    assert len(cell["exit_test_acc_mean"]) == 4
    t = targets("resnet8", got)
    assert abs(t["k2_gap_points"] - 100 * (0.886 - 0.911)) < 1e-9 and t["k2_within_2"] is False
    assert abs(t["k4_gap_points"] + 4.5) < 1e-9 and t["k4_within_4"] is False
