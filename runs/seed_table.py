#!/usr/bin/env python
"""The seeds' comparison table as a runnable study.

The seeds (EdgeNES, Babkin 2023-24) compare, on CIFAR-100 with ensembles of 3 over several
seeds, by test accuracy (%) and GPU-hours:

    DARTS                 one DARTS search, its genotype trained once      (darts)
    Random architecture   one random genotype, trained once                (random, 1 member)
    DARTS ensembling      k = M DARTS searches, each genotype trained      (darts_ens)
    Random ensemble       M random genotypes                               (random, M members)
    EdgeNES               DARTS search + hypernetwork + sampled members    (edgenes)

This study runs those rows plus NES-RE (nes_re), TPE (tpe) and XNAS (xnas) on one budget, then
prints the table in the seeds' layout with NLL and ECE added, and writes the study's report
(report.md, plots, p-values) next to it. Every row is one nestune strategy in one Study: each
(strategy, seed) is a Ray Tune run tracked in MLflow, and re-running the same command resumes
it (nothing finished is trained again).

Sizes and epochs default to nestune's own defaults for the seeds' methods (the EdgeNES and
DARTS search settings: 10 epochs, C=8, 5 cells; members: 10 epochs, C=8, 5 cells), with every
size and length a flag; --scale multiplies all epochs at once. Pool strategies (nes_re, tpe)
train --members networks and select M by ForwardSelect; EdgeNES samples --edgenes-samples
architectures.

Examples:

    # CIFAR-10, small: a quick check on 2 CPU cores
    python runs/seed_table.py --data cifar10 --root ~/data/cifar10 --subset 2000 \\
        --scale 0.2 --seeds 0 1 --members 4 --edgenes-samples 4

    # the default sizes on CIFAR-100 on a GPU box (4 trials share each GPU)
    python runs/seed_table.py --data cifar100 --root /data/cifar100 --seeds 0 1 2 --gpu 0.25

    # print the table of a finished study again, without running anything
    python runs/seed_table.py --data cifar10 --root ~/data/cifar10 --table-only
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

# (label, strategy, the row's name in the seeds' table); the first five are the seeds' rows.
ROWS: list[tuple[str, str, str]] = [
    ("darts", "darts", "DARTS"),
    ("random_arch", "random", "Random architecture"),
    ("darts_ens", "darts_ens", "DARTS ensembling"),
    ("random_ens", "random", "Random ensemble"),
    ("edgenes", "edgenes", "EdgeNES"),
    ("nes_re", "nes_re", "NES-RE"),
    ("tpe", "tpe", "TPE"),
    ("xnas", "xnas", "XNAS"),
]


def _scaled(epochs: int, scale: float) -> int:
    return max(1, int(round(epochs * scale)))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every flag, and the examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seed_table.py",
        description=__doc__.split("\n\n")[0] + " Runs the seeds' rows (DARTS, random "
        "architecture, DARTS ensembling, random ensemble, EdgeNES) plus NES-RE, TPE and XNAS as "
        "one nestune Study, then prints accuracy %, GPU-hours, NLL and ECE per row, mean ± std "
        "over seeds, in the seeds' layout, and writes the study's report.",
        epilog="examples:\n" + __doc__.split("Examples:\n", 1)[1].rstrip(),
        formatter_class=_HelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("cifar10", "cifar100", "imagefolder"), default="cifar100",
                   help="data set (the seeds used CIFAR-100)")
    d.add_argument("--root", type=Path, default=None,
                   help="where the data set is: torchvision's CIFAR folder, or an ImageFolder "
                   "tree with train/ and test/ (the offline CIFAR-10 copy, unpacked); required "
                   "unless --download")
    d.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --root")
    d.add_argument("--subset", type=int, default=None,
                   help="use only this many training images (stratified, seeded), for small-scale "
                   "runs; None: all")
    d.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training images held out for selection (never the test split)")

    s = p.add_argument_group("study")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per strategy per seed")
    s.add_argument("--ensemble-size", "-M", type=int, default=3, help="ensemble size M (the seeds: 3)")
    s.add_argument("--members", type=int, default=10,
                   help="trained members per run for the pool strategies (nes_re, tpe); also the "
                   "study's member budget, which darts/darts_ens/edgenes/random stay under")
    s.add_argument("--edgenes-samples", type=int, default=10,
                   help="architectures EdgeNES samples at λ ~ U(0, Λ)")
    s.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS],
                   choices=[r[0] for r in ROWS], metavar="ROW",
                   help="which rows to run: " + ", ".join(r[0] for r in ROWS))
    s.add_argument("--name", default=None, help="study name; None: seed_table_<data>")
    s.add_argument("--output-dir", type=Path, default=None,
                   help="study folder; None: ./nestune_runs/<name>")

    t = p.add_argument_group("sizes and lengths")
    t.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count below")
    t.add_argument("--epochs", type=int, default=10, help="training epochs of every member")
    t.add_argument("--C", type=int, default=8, help="initial channels of the trained networks")
    t.add_argument("--layers", type=int, default=5, help="cells of the trained networks")
    t.add_argument("--batch-size", type=int, default=64, help="member training batch size")
    t.add_argument("--search-epochs", type=int, default=10,
                   help="epochs of each supernet search (DARTS, XNAS, EdgeNES' DARTS and hypernetwork)")
    t.add_argument("--search-C", type=int, default=8, help="initial channels of the supernets")
    t.add_argument("--search-layers", type=int, default=5, help="cells of the supernets")
    t.add_argument("--search-batch-size", type=int, default=64, help="supernet batch size")

    r = p.add_argument_group("resources")
    r.add_argument("--gpu", type=float, default=None,
                   help="GPUs per trial (0.25: four trials share a GPU); None: 1 if CUDA is there, else 0")
    r.add_argument("--cpu", type=float, default=1, help="CPUs per trial")
    r.add_argument("--max-concurrent", type=int, default=None, help="bound on concurrent trials")

    o = p.add_argument_group("output")
    o.add_argument("--no-report", action="store_true", help="skip report.md")
    o.add_argument("--table-only", action="store_true",
                   help="run nothing: print the table of the study already in the output folder")
    o.add_argument("--dry-run", action="store_true", help="print the study's settings and exit")
    return p


def strategies(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], str]]:
    """The (strategy, hyperparameters, label) of every requested row."""
    search_epochs = _scaled(args.search_epochs, args.scale)
    search = {"search_epochs": search_epochs, "search_C": args.search_C,
              "search_layers": args.search_layers, "search_batch_size": args.search_batch_size}
    m = args.ensemble_size
    hp: dict[str, dict[str, Any]] = {
        "darts": dict(search),
        "random_arch": {"max_members": 1},
        "darts_ens": {"k": m, **search},
        "random_ens": {"max_members": m},
        "edgenes": {"darts_epochs": search_epochs, "darts_C": args.search_C,
                    "darts_layers": args.search_layers, "darts_batch_size": args.search_batch_size,
                    **search, "num_samples": args.edgenes_samples},
        "nes_re": {"population": max(2, min(10, args.members // 2)),
                   "candidates": max(1, min(5, args.members // 4))},
        "tpe": {"startup_trials": max(1, min(10, args.members // 2))},
        "xnas": {"k": m, **search},
    }
    return [(name, hp[label], label) for label, name, _ in ROWS if label in args.rows]


def make_study(args: argparse.Namespace) -> Any:
    from nestune.platform.study import Study

    if args.root is None and not args.download:
        raise SystemExit("--root: where is the data set? (or --download to fetch CIFAR)")
    gpu = args.gpu
    if gpu is None:
        import torch

        gpu = 1.0 if torch.cuda.is_available() else 0.0
    data_options: dict[str, Any] = {"val_fraction": args.val_fraction, "download": args.download}
    if args.root is not None:
        data_options["root"] = str(args.root.expanduser().resolve())
    if args.subset is not None:
        data_options["subset"] = args.subset
    name = args.name or f"seed_table_{args.data}"
    return Study(
        name=name,
        data=args.data,
        strategies=strategies(args),
        seeds=args.seeds,
        budget={"members": max(args.members, args.edgenes_samples, args.ensemble_size)},
        ensemble_size=args.ensemble_size,
        train={"epochs": _scaled(args.epochs, args.scale), "C": args.C, "layers": args.layers,
               "batch_size": args.batch_size},
        resources={"cpu": args.cpu, "gpu": gpu},
        data_options=data_options,
        output_dir=args.output_dir,
        max_concurrent=args.max_concurrent,
    )


def _cell(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def seed_table(table: Any, gpu: bool) -> str:
    """The per-seed table of a study as the seeds print it: one row per method, accuracy %
    and GPU-hours (then NLL, ECE %), mean ± std over seeds."""
    from nestune.platform.stats import summary_table

    names = {label: row for label, _, row in ROWS}
    order = [label for label, _, _ in ROWS if label in set(table["strategy"])]
    order += [s for s in dict.fromkeys(table["strategy"]) if s not in order]
    s = summary_table(table, ["accuracy", "device_hours", "nll", "ece"], order=order).set_index("strategy")
    hours = "GPU-hours" if gpu else "device-hours"
    head = f"{'Method':<22} {'Accuracy, %':>15} {hours:>15} {'NLL':>15} {'ECE, %':>13} {'seeds':>5}"
    lines = [head, "-" * len(head)]
    for label in order:
        r = s.loc[label]
        lines.append(
            f"{names.get(label, label):<22} "
            f"{_cell(100 * r['accuracy_mean'], 100 * r['accuracy_std'], 2):>15} "
            f"{_cell(r['device_hours_mean'], r['device_hours_std'], 3):>15} "
            f"{_cell(r['nll_mean'], r['nll_std'], 3):>15} "
            f"{_cell(100 * r['ece_mean'], 100 * r['ece_std'], 2):>13} {int(r['n']):>5}"
        )
    return "\n".join(lines)


def describe(settings: dict[str, Any]) -> str:
    """One line with the scale a study ran at, read from its stored settings (so --table-only
    describes the study it prints, not the flags it was given)."""
    data = settings.get("data") or {}
    data = data if isinstance(data, dict) else {"name": data}
    train = settings.get("train") or {}
    search = next((s.get("hparams") or {} for s in settings.get("strategies") or []
                   if (s.get("hparams") or {}).get("search_epochs")), {})
    parts = [
        f"{data.get('name', '?')}, subset {data.get('subset') or 'all'}",
        f"seeds {settings.get('seeds')}",
        f"M={settings.get('ensemble_size')}",
        f"budget {settings.get('budget')}",
        f"members {train.get('epochs', '?')} epochs C={train.get('C', '?')} "
        f"layers={train.get('layers', '?')}",
    ]
    if search:
        parts.append(f"searches {search.get('search_epochs')} epochs C={search.get('search_C')} "
                     f"layers={search.get('search_layers')}")
    return f"{settings.get('name', 'study')}: " + ", ".join(parts)


def auc_line(curves: Any, num_classes: int, gpu: bool, a: str = "darts_ens", b: str = "edgenes",
             paired: Any = "auto") -> str | None:
    """The seeds' sentence comparing how fast two rows build an ensemble, e.g. "AUC for DartsEns
    2.90 ± 0.19, EdgeNES 2.78 ± 0.13, p-value for t-test 0.0329": the area under ensemble test
    NLL against cumulative hours, over the window the report uses (0 to the longest run's end,
    the uniform predictor's NLL before a run's first ensemble), mean ± std over seeds, and the
    t-test of the report (paired when both rows ran the same seeds, else Welch's). None when a
    row is missing."""
    from nestune.platform.stats import anytime_auc, pairwise_tests, uniform_value

    if curves is None or curves.empty or not {a, b} <= set(curves["strategy"]):
        return None
    # One window for the whole study, as in the report, not one for this pair alone.
    every = anytime_auc(curves, "nll", initial=uniform_value("nll", num_classes))
    auc = every[every["strategy"].isin([a, b])]
    names = {label: row for label, _, row in ROWS}
    parts = []
    for label in (a, b):
        x = auc[auc["strategy"] == label]["auc"].to_numpy(dtype=float)
        x = x[[math.isfinite(v) for v in x]]
        mean = float(x.mean()) if len(x) else math.nan
        std = float(x.std(ddof=1)) if len(x) >= 2 else math.nan
        parts.append(f"{names.get(label, label)} "
                     + ("–" if not math.isfinite(mean) else f"{mean:#.3g}"
                        + (f" ± {std:#.2g}" if math.isfinite(std) else "")))
    test = pairwise_tests(auc, "auc", paired=paired, order=[a, b]).iloc[0]
    p = test["pvalue"]
    pv = (f"p-value for t-test ({test['test']}) {p:.3g}" if math.isfinite(p)
          else f"no p-value ({test['note']})")
    hours = "GPU-hours" if gpu else "device-hours"
    return f"AUC of ensemble test NLL vs {hours} for " + ", ".join(parts) + f", {pv}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    study = make_study(args)
    if args.dry_run:
        import json

        print(json.dumps(study.settings(), indent=1))
        return 0
    if args.table_only:
        from nestune.platform.study import StudyResult

        result = StudyResult.load(study.output_dir)
    else:
        result = study.run()
    gpu = float(study.resources.get("gpu") or 0) > 0
    print(f"\n{describe(result.settings or study.settings())}\n")
    print(seed_table(result.table(), gpu))
    import numpy as np

    line = auc_line(result.curves, int(np.asarray(result.labels("test")).max()) + 1, gpu)
    if line:
        print("\n" + line)
    if not args.no_report:
        from nestune.platform.report import write_report

        print(f"\nReport: {write_report(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
