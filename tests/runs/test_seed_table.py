"""runs/seed_table.py: its flags, the study it builds and the table it prints (nothing run)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "runs" / "seed_table.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("seed_table", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_help_documents_the_flags():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--data", "--root", "--seeds", "--ensemble-size", "--scale", "--epochs",
                 "--search-epochs", "--subset", "--gpu", "--rows", "--table-only"):
        assert flag in out
    assert "cifar10" in out and "cifar100" in out and "imagefolder" in out
    assert "examples:" in out and "--table-only" in out.split("examples:")[1]


def test_rows_and_scaling(mod, tmp_path):
    args = mod.build_parser().parse_args(
        ["--data", "cifar10", "--root", str(tmp_path), "--scale", "0.2", "-M", "3",
         "--rows", "darts", "random_arch", "darts_ens", "random_ens", "edgenes"])
    got = {label: (name, hp) for name, hp, label in mod.strategies(args)}
    assert list(got) == ["darts", "random_arch", "darts_ens", "random_ens", "edgenes"]
    assert got["random_arch"] == ("random", {"max_members": 1})
    assert got["random_ens"] == ("random", {"max_members": 3})
    assert got["darts_ens"][1]["k"] == 3 and got["darts_ens"][1]["search_epochs"] == 2
    assert got["edgenes"][1]["darts_epochs"] == 2
    study = mod.make_study(args)
    assert study.train.epochs == 2 and study.ensemble_size == 3
    assert study.data_spec["root"] == str(tmp_path.resolve())


def test_table_in_the_seeds_layout(mod):
    rows = [{"strategy": s, "seed": seed, "accuracy": a + 0.01 * seed, "device_hours": h,
             "nll": 1.0, "ece": 0.05}
            for s, a, h in (("edgenes", 0.70, 2.1), ("darts_ens", 0.68, 3.6), ("darts", 0.60, 1.0))
            for seed in (0, 1)]
    text = mod.seed_table(pd.DataFrame(rows), gpu=True)
    lines = text.splitlines()
    assert "Accuracy, %" in lines[0] and "GPU-hours" in lines[0]
    # the seeds' order, their names
    assert [ln.split("  ")[0] for ln in lines[2:]] == ["DARTS", "DARTS ensembling", "EdgeNES"]
    assert "70.50 ± 0.71" in text and "2.100 ± 0.000" in text


def test_auc_line_is_the_seeds_sentence_with_the_reports_test(mod):
    from scipy import stats as st

    from nestune.platform.stats import anytime_auc, uniform_value

    rows = []
    for strategy, base in (("darts_ens", 1.0), ("edgenes", 0.8), ("darts", 1.2)):
        for seed in (0, 1, 2):
            for k, t in enumerate((0.5, 1.0, 1.5 + 0.1 * seed)):
                late = 0.2 * (strategy == "darts")
                rows.append({"strategy": strategy, "seed": seed, "device_hours": t + late,
                             "nll": base / (k + 1) + 0.05 * seed * (strategy == "edgenes"),
                             "error": 0.1})
    curves = pd.DataFrame(rows)
    line = mod.auc_line(curves, 100, gpu=True)
    # the window is the whole study's (darts ends last), not the pair's
    auc = anytime_auc(curves, "nll", initial=uniform_value("nll", 100))
    a = auc[auc.strategy == "darts_ens"].sort_values("seed")["auc"].to_numpy()
    b = auc[auc.strategy == "edgenes"].sort_values("seed")["auc"].to_numpy()
    p = st.ttest_rel(a, b).pvalue
    assert line == (f"AUC of ensemble test NLL vs GPU-hours for DARTS ensembling {a.mean():#.3g} ± "
                    f"{a.std(ddof=1):#.2g}, EdgeNES {b.mean():#.3g} ± {b.std(ddof=1):#.2g}, "
                    f"p-value for t-test (paired) {p:.3g}")
    # different seeds: Welch's test
    other = curves[~((curves.strategy == "edgenes") & (curves.seed == 0))]
    assert "(welch)" in mod.auc_line(other, 100, gpu=False)
    assert mod.auc_line(curves[curves.strategy != "edgenes"], 100, gpu=True) is None


def test_describe_reads_the_studys_own_settings(mod):
    settings = {"name": "seed_table_cifar10", "data": {"name": "cifar10", "subset": 500},
                "seeds": [0, 1], "ensemble_size": 3, "budget": {"members": 4},
                "train": {"epochs": 2, "C": 8, "layers": 5},
                "strategies": [{"label": "random_arch", "hparams": {"max_members": 1}},
                               {"label": "darts_ens", "hparams": {"search_epochs": 2, "search_C": 8,
                                                                  "search_layers": 5}}]}
    text = mod.describe(settings)
    assert text.startswith("seed_table_cifar10: cifar10, subset 500, seeds [0, 1], M=3")
    assert "members 2 epochs C=8 layers=5" in text and "searches 2 epochs C=8 layers=5" in text
