"""The packaged command line: `headscope` and its subcommands, the thin wrappers that keep the
old commands (scripts/build_cache.py, python -m app), `headscope runs`, and no sys.path edits."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import cli
from analysis.serving.transport import WORKER_COMMAND
from conftest import make_synthetic_run as make_run

ROOT = Path(__file__).resolve().parent.parent
HEADSCOPE = Path(sys.executable).parent / "headscope"


def options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def subparser(name):
    return next(a for a in cli.parser()._actions if a.dest == "command").choices[name]


def test_the_headscope_command_is_installed_with_help_on_every_subcommand():
    assert HEADSCOPE.is_file(), "`pip install -e .` (scripts/setup_env.sh does it) installs the headscope command"
    out = subprocess.run([str(HEADSCOPE), "--help"], capture_output=True, text=True, check=True, cwd="/").stdout
    for name in ("build", "serve", "worker", "runs"):
        assert name in out
        sub = subprocess.run([str(HEADSCOPE), name, "--help"], capture_output=True, text=True, check=True,
                             cwd="/").stdout
        assert sub.startswith(f"usage: headscope {name}"), sub[:200]
    missing = subprocess.run([str(HEADSCOPE)], capture_output=True, text=True, cwd="/")
    assert missing.returncode == 2 and "COMMAND" in missing.stderr


def test_old_commands_share_the_one_definition_of_their_options():
    assert options(cli.build_parser()) == options(subparser("build"))
    assert options(cli.serve_parser()) == options(subparser("serve"))
    for script, sub in (([sys.executable, "scripts/build_cache.py"], "build"), ([sys.executable, "-m", "app"], "serve")):
        text = subprocess.run(script + ["--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert options(subparser(sub)) <= {w.strip("[],") for w in text.split()}, script


def test_headscope_worker_runs_the_documented_worker_command():
    args = subparser("worker").parse_args([])
    assert ["celery", "-A", "worker.celery_app", *cli.worker_argv(args)][:-1] == shlex.split(WORKER_COMMAND)
    args = subparser("worker").parse_args(["--concurrency", "2", "--", "--without-gossip"])
    assert cli.worker_argv(args)[-1] == "--without-gossip" and "--concurrency=2" in cli.worker_argv(args)


def test_headscope_runs_lists_each_run_with_its_state(tmp_path, capsys):
    make_run(tmp_path / "good", n_images=3, layers=2, heads=2, grid=2, model="test_vit", img_size=32)
    for name, change in (("old", {"schema_version": 0}), ("half", {"status": "building"})):
        run = make_run(tmp_path / name, n_images=2, layers=2, heads=2, grid=2)
        mf = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**mf, **change}))
    assert cli.main(["runs", "--cache-dir", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(lines) == {"good", "old", "half"}
    assert lines["good"].split()[1:4] == ["complete", "test_vit", "3"] and lines["good"].split()[5] in ("KB", "MB")
    assert "unreadable" in lines["old"] and "schema v0" in lines["old"]
    assert "building" in lines["half"] and "has not finished" in lines["half"]
    assert cli.main(["runs", "--cache-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["error"] is None for r in listed} == {"good": True, "old": False, "half": False}
    assert cli.main(["runs", "--cache-dir", str(tmp_path / "empty")]) == 0
    assert "No runs under" in capsys.readouterr().out


@pytest.mark.parametrize("folder", ["scripts", "tests"])
def test_no_sys_path_edits(folder):
    """The package is installed (pip install -e .) and pytest.ini sets pythonpath: no script or test
    changes the module search path."""
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*\+?=")
    offenders = [p.name for p in (ROOT / folder).glob("*.py") if edit.search(p.read_text())]
    assert not offenders
