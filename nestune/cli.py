"""``nestune quickstart | run STUDY.toml | report STUDY | ui [STUDY_DIR]``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The quickstart study: every registered strategy on digits, two seeds (so the report has
# p-values), the same small budget, small networks, members scored under dataset shift on 100
# images per corrupted copy, local Ray. runs/quickstart.toml is the same study as a file.
QUICKSTART: dict[str, Any] = {
    "name": "quickstart",
    "data": "digits",
    "seeds": [0, 1],
    "budget": {"members": 4},
    "ensemble_size": 3,
    "train": {"epochs": 4, "C": 8, "layers": 3, "batch_size": 64},
    "resources": {"cpu": 1, "gpu": 0},
    "shift": {"subset": 100},
}
# Small settings of the strategies we know; other registered strategies get their defaults
# with every search shrunk (see quickstart_hparams).
QUICKSTART_HPARAMS: dict[str, dict[str, Any]] = {
    "random": {},
    "nes_re": {"population": 2, "candidates": 2},
    "deep_ens": {},
    "tpe": {"startup_trials": 2},
    # Batches of 128: on 8x8 digits a supernet step costs about the same at 64 or 128 images,
    # so the searches take about 30 % less time for the same epochs.
    "darts_ens": {"search_epochs": 2, "search_C": 4, "search_layers": 3, "search_batch_size": 128},
    "darts": {"search_epochs": 2, "search_C": 4, "search_layers": 3, "search_batch_size": 128},
    "xnas": {"search_epochs": 2, "search_C": 4, "search_layers": 3, "search_batch_size": 128},
    # EdgeNES' hypernetwork search keeps batches of 64: its C and t schedules need the steps.
    "edgenes": {"darts_epochs": 2, "darts_C": 4, "darts_layers": 3, "darts_batch_size": 128,
                "search_epochs": 2, "search_C": 4, "search_layers": 3},
}
QUICKSTART_FIRST = ("random", "nes_re", "deep_ens", "tpe")
_SHRINK = (("epochs", 2), ("_C", 4), ("layers", 3))


def quickstart_hparams(name: str) -> dict[str, Any]:
    """The quickstart's hyperparameters of strategy ``name``: the table above, else its
    defaults with every ``*epochs``, ``*_C`` and ``*layers`` field capped small."""
    from nestune.platform.strategy import get_strategy

    cls = get_strategy(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name in QUICKSTART_HPARAMS:
        return {k: v for k, v in QUICKSTART_HPARAMS[name].items() if k in fields}
    out: dict[str, Any] = {}
    for fname, f in fields.items():
        default = f.default
        if not isinstance(default, int) or isinstance(default, bool):
            continue
        for suffix, cap in _SHRINK:
            if fname.endswith(suffix) and default > cap:
                out[fname] = cap
    return out


def quickstart_strategies() -> list[tuple[str, dict[str, Any], str]]:
    """random, nes_re, deep_ens, tpe, then every other registered strategy."""
    from nestune.platform.strategy import STRATEGIES, _load_builtins

    _load_builtins()
    names = [n for n in QUICKSTART_FIRST if n in STRATEGIES]
    names += [n for n in STRATEGIES if n not in names]
    return [(n, quickstart_hparams(n), n) for n in names]


# ------------------------------------------------------------------------------------ commands


def _print_table(result: Any) -> None:
    table = result.table()
    cols = ["strategy", "seed", "accuracy", "nll", "ece", "brier", "oracle_nll", "disagreement",
            "best_member_accuracy", "members", "device_hours"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _print_ui_hint(result: Any) -> None:
    uri = result.tracking_uri or ""
    print(f"\nStudy folder: {result.output_dir}")
    if uri.startswith("sqlite:"):
        print(f"Open it in MLflow:  nestune ui {result.output_dir}")
        print(f"   (the same as:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")
    else:
        print(f"Tracked in MLflow at {uri} (experiment {result.name!r})")
    print(f"Report:             nestune report {result.output_dir}")


def _run_study(study: Any) -> int:
    import time

    t0 = time.time()
    result = study.run()
    print(f"\n{study.name}: done in {time.time() - t0:.0f}s")
    _print_table(result)
    _print_ui_hint(result)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from nestune.platform.study import Study

    config = {**QUICKSTART, "strategies": []}
    if args.budget is not None:
        config["budget"] = {"members": args.budget}
    chosen = quickstart_strategies()
    if args.strategies:
        wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {n for n, _, _ in chosen}]
        if unknown:
            raise ValueError(f"--strategies: not registered: {', '.join(unknown)}")
        chosen = [c for c in chosen if c[0] in wanted]
    kwargs = {k: v for k, v in config.items() if k != "strategies"}
    study = Study(**kwargs, strategies=chosen, output_dir=args.output_dir)
    print(f"nestune quickstart: {', '.join(n for n, _, _ in chosen)} on digits, "
          f"{study.budget.to_dict()} each, local Ray\n", flush=True)
    return _run_study(study)


def cmd_run(args: argparse.Namespace) -> int:
    from nestune.platform.runner import Budget
    from nestune.platform.study import Study

    overrides: dict[str, Any] = {"output_dir": args.output_dir}
    if args.budget is not None:
        overrides["budget"] = Budget(members=args.budget)
    study = Study.from_file(args.study, **overrides)
    return _run_study(study)


def _study_dir(spec: str | None) -> Path:
    """A study folder from a folder, a study name under ./nestune_runs, or a study file."""
    if spec is None:
        runs = Path.cwd() / "nestune_runs"
        found = sorted(p.parent for p in runs.glob("*/study.json")) if runs.is_dir() else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError("STUDY: no study found under ./nestune_runs; give its folder")
        raise ValueError("STUDY: several studies under ./nestune_runs ("
                         + ", ".join(p.name for p in found) + "); name one")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".toml":
        from nestune.platform.study import Study

        return Study.from_file(p).output_dir
    if p.is_dir():
        return p.resolve()
    named = Path.cwd() / "nestune_runs" / spec
    if named.is_dir():
        return named
    raise ValueError(f"STUDY: {spec!r} is neither a study folder, a study name under "
                     "./nestune_runs, nor a study file")


def cmd_report(args: argparse.Namespace) -> int:
    from nestune.platform.report import write_report

    study_dir = _study_dir(args.study)
    horizon: Any = args.horizon
    if horizon not in ("longest", "shortest"):
        try:
            horizon = float(horizon)
        except ValueError:
            raise ValueError(f"--horizon: expected 'longest', 'shortest' or device-hours, "
                             f"got {args.horizon!r}") from None
    paired = {"auto": "auto", "yes": True, "no": False}[args.paired]
    path = write_report(study_dir, paired=paired, horizon=horizon, shift_select=args.shift_select,
                        log_mlflow=not args.no_mlflow)
    print(f"Report: {path}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from nestune.platform.tracking import MlflowServer

    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if args.study_dir is None and env_uri and not env_uri.startswith("sqlite:"):
        print(f"MLFLOW_TRACKING_URI points at a server already: {env_uri}")
        return 0
    study_dir = _study_dir(args.study_dir)
    db = study_dir / "mlflow.db"
    if not db.is_file():
        raise ValueError(f"STUDY_DIR: {study_dir} has no mlflow.db (was it tracked elsewhere? "
                         "see its study.json)")
    if args.port and not _port_free(args.host, args.port):
        # Checked here: mlflow server itself exits with a traceback (and code 0) on a busy port.
        raise ValueError(f"--port: {args.host}:{args.port} is already in use; give another "
                         "(--port 0 picks a free one)")
    server = MlflowServer(f"sqlite:///{db}", artifacts_destination=study_dir / "mlartifacts",
                          host=args.host, port=args.port, workers=1, quiet=not args.verbose)
    # Set explicitly: a shell that starts us in the background leaves SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.wait_ready(timeout=180)
        print(f"MLflow UI for {study_dir.name}: {server.url}   (Ctrl-C stops it)", flush=True)
        server.process.wait()
        return server.process.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server will: a port left in TIME_WAIT by an earlier server counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _raise_interrupt(signum: int, frame: Any) -> None:
    # SIGINT/SIGTERM stop the UI through the finally that stops the server's process group.
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="compare every registered strategy on digits (minutes)")
    q.add_argument("--output-dir", default=None, help="study folder (default ./nestune_runs/quickstart)")
    q.add_argument("--budget", type=int, default=None, help="members per strategy (default 4)")
    q.add_argument("--strategies", default=None, help="comma-separated subset to run")
    q.set_defaults(fn=cmd_quickstart)

    r = sub.add_parser("run", help="run (or resume) a study file")
    r.add_argument("study", help="a TOML study file, e.g. runs/quickstart.toml")
    r.add_argument("--output-dir", default=None, help="override the file's output_dir")
    r.add_argument("--budget", type=int, default=None, help="override the budget (members)")
    r.set_defaults(fn=cmd_run)

    rep = sub.add_parser("report", help="write the study's report (table, curves, significance)")
    rep.add_argument("study", help="study folder, study name under ./nestune_runs, or study file")
    rep.add_argument("--horizon", default="longest",
                     help="end of the common AUC window: 'longest' (default: the longest run's "
                     "final cost, earlier runs holding their final ensemble), 'shortest', or "
                     "device-hours")
    rep.add_argument("--paired", choices=("auto", "yes", "no"), default="auto",
                     help="p-values by the paired t-test over shared seeds (yes), Welch's (no), or "
                     "paired where two strategies ran the same seeds (auto, default)")
    rep.add_argument("--shift-select", choices=("val", "shifted_val"), default="val",
                     help="ensembles shown under shift: the study's own (val) or ForwardSelect on "
                     "the shifted validation split, as in NES (shifted_val)")
    rep.add_argument("--no-mlflow", action="store_true",
                     help="do not log the report to a study-level MLflow run")
    rep.set_defaults(fn=cmd_report)

    u = sub.add_parser("ui", help="serve MLflow's UI for a study's store on 127.0.0.1")
    u.add_argument("study_dir", nargs="?", default=None,
                   help="study folder (default: the only study under ./nestune_runs)")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000, help="default 5000; 0 picks a free port")
    u.add_argument("--verbose", action="store_true", help="show the server's own log")
    u.set_defaults(fn=cmd_ui)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ValueError as e:
        print(f"nestune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnestune {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        from nestune.platform.study import StudyInterrupted

        if isinstance(e, StudyInterrupted):
            print(f"nestune {args.command}: {e}", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
