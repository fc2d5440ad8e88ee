"""The command line: study files and their validation, the quickstart's settings, the report
hook, and `nestune ui` serving MLflow and stopping its whole process group on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nestune import cli
from nestune.platform.study import Study, StudyResult

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TOML = REPO / "runs" / "quickstart.toml"


def test_quickstart_file_is_the_quickstart_study(tmp_path):
    study = Study.from_file(QUICKSTART_TOML, output_dir=tmp_path)
    base = Study(**{k: v for k, v in cli.QUICKSTART.items()}, strategies=cli.quickstart_strategies(),
                 output_dir=tmp_path)
    mine, theirs = study.settings(), base.settings()
    for key in ("name", "data", "seeds", "budget", "ensemble_size", "train", "resources", "shift"):
        assert mine[key] == theirs[key], key
    in_file = {s["label"]: s["hparams"] for s in mine["strategies"]}
    in_cli = {s["label"]: s["hparams"] for s in theirs["strategies"]}
    assert list(in_file)[:4] == ["random", "nes_re", "deep_ens", "tpe"]
    for name, hp in in_file.items():
        assert in_cli[name] == hp, name


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "study.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "s"\ncolour = 1\n[[strategies]]\nname = "random"\n', "unknown field 'colour'"),
        ('data = "digits"\n[[strategies]]\nname = "random"\n', "'name' is required"),
        ('name = "s"\n', "'strategies'"),
        ('name = "s"\n[[strategies]]\nname = "nes_re"\npopulation = "ten"\n',
         r"strategies\[0\].*population"),
        ('name = "s"\n[[strategies]]\nname = "random"\nbogus = 1\n', r"strategies\[0\].*bogus"),
        ('name = "s"\n[[strategies]]\nname = "no_such"\n', r"strategies\[0\]\.name"),
        ('name = "s"\n[[strategies]]\nname = "random"\noptional = "yes"\n', r"strategies\[0\]\.optional"),
        ('name = "s"\n[train]\nepochs = 0\n[[strategies]]\nname = "random"\n', "train.*epochs"),
        ('name = "s"\nbudget = { members = 0 }\n[[strategies]]\nname = "random"\n', "budget.members"),
        ('name = "s"\n[resources]\ncpu = -1\n[[strategies]]\nname = "random"\n', "resources.cpu"),
        ('name = "s"\nseeds = 3.5\n[[strategies]]\nname = "random"\n', "seeds"),
        ('name = "s"\n[[strategies]\n', "not valid TOML"),
    ],
)
def test_study_file_fields_are_validated(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Study.from_file(_write(tmp_path, text))


def test_optional_strategies_are_skipped_and_cli_reports_errors(tmp_path, capsys):
    text = ('name = "s"\nbudget = 2\n[[strategies]]\nname = "random"\n'
            '[[strategies]]\nname = "not_installed"\noptional = true\n')
    study = Study.from_file(_write(tmp_path, text), output_dir=tmp_path / "out")
    assert [s.label for s in study.specs] == ["random"] and study.budget.members == 2
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _fake_results(out: Path) -> None:
    table = pd.DataFrame([{"strategy": "random", "seed": 0, "accuracy": 0.9, "nll": 0.3, "ece": 0.1,
                           "brier": 0.2, "oracle_nll": 0.1, "disagreement": 0.2,
                           "best_member_accuracy": 0.88, "avg_member_nll": 0.4, "members": 2,
                           "device_hours": 0.001}])
    StudyResult(out, table, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
                {"val": np.zeros(3), "test": np.zeros(4)}, {"name": "fake"}).save()


def test_report_passes_its_flags_to_the_report_module(tmp_path, monkeypatch, capsys):
    _fake_results(tmp_path)
    calls = []
    fake = types.ModuleType("nestune.platform.report")
    fake.write_report = lambda d, **kw: calls.append((Path(d), kw)) or Path(d) / "report.md"
    monkeypatch.setitem(sys.modules, "nestune.platform.report", fake)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert calls[-1] == (tmp_path.resolve(), {"paired": "auto", "horizon": "longest",
                                              "shift_select": "val", "log_mlflow": True})
    assert "report.md" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path), "--horizon", "0.5", "--paired", "no",
                     "--shift-select", "shifted_val", "--no-mlflow"]) == 0
    assert calls[-1][1] == {"paired": False, "horizon": 0.5, "shift_select": "shifted_val",
                            "log_mlflow": False}
    assert cli.main(["report", str(tmp_path), "--horizon", "soon"]) == 2
    assert "--horizon" in capsys.readouterr().err


def test_ui_serves_the_store_and_stops_its_process_group(tmp_path):
    psutil = pytest.importorskip("psutil")
    from nestune.platform.tracking import Tracker, free_port

    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ui-test",
                artifact_location=(tmp_path / "mlartifacts").as_uri())
    t.end_run(t.start_parent("random", 0, {"x": 1}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nestune.cli", "ui", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    spawned: list = []
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        spawned = psutil.Process(proc.pid).children(recursive=True)
        assert spawned
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in spawned):
            time.sleep(0.2)
        assert not any(_alive(p) for p in spawned), "the server outlived `nestune ui`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in spawned:
            if _alive(p):
                p.kill()


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ui_on_a_busy_port_names_the_port(tmp_path, capsys):
    import socket

    (tmp_path / "mlflow.db").touch()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["ui", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port: 127.0.0.1:{port} is already in use" in capsys.readouterr().err
