"""cluster/README.md's local-cluster commands, run as the README writes them.

The fenced ``bash`` blocks marked ``<!-- tested-locally -->`` are extracted and run by bash,
with only these mechanical changes, so README and test cannot drift:

* ports: GCS 6379 -> 6400, dashboard 8265 -> 8400 (this test's range, apart from the other
  Ray clusters on the machine), plus ``--ray-client-server-port=6401
  --dashboard-agent-listen-port=6402 --num-cpus=1 --temp-dir=<private dir>`` on ``ray start``;
* the run directory ``/tmp/alignx-demo`` -> a fresh temporary directory;
* ``HOME`` is a temporary directory, so ``ray get-auth-token --generate`` writes a token of
  this test's own, and the venv's ``bin`` comes first on ``PATH`` (the README activates it).

The head runs with ``RAY_AUTH_MODE=token``, so the submission, the listing and the refusals
without / with a wrong token all go through Ray's token auth. Teardown kills the processes
whose command line names the private temp dir (not ``ray stop``: that would stop every Ray
on the machine).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from alignx.axes import AXES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"
GCS, CLIENT, AGENT, DASHBOARD = 6400, 6401, 6402, 8400


def readme_local_blocks() -> str:
    """The README's ``<!-- tested-locally -->`` bash blocks, in order."""
    blocks = re.findall(r"<!-- tested-locally -->\n```bash\n(.*?)```", README.read_text(), re.S)
    assert blocks, "cluster/README.md has no <!-- tested-locally --> block"
    return "".join(blocks)


def localize(script: str, temp: Path, run_dir: Path) -> str:
    """Apply the documented substitutions (ports, temp dir, run dir) and nothing else."""
    start = re.search(r"^ray start --head .*$", script, re.M)
    assert start and "--port=6379" in start.group(0) and "--dashboard-port=8265" in start.group(0)
    script = script.replace(
        "--port=6379", f"--port={GCS} --ray-client-server-port={CLIENT} "
        f"--dashboard-agent-listen-port={AGENT} --num-cpus=1 --temp-dir={temp}")
    script = script.replace("8265", str(DASHBOARD)).replace("/tmp/alignx-demo", str(run_dir))
    assert "6379" not in script
    return script


def _stop_cluster(temp: Path) -> None:
    """SIGKILL every process whose command line names this cluster's temp dir."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if str(temp) in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def readme_cluster(tmp_path_factory):
    """Run the README's local block; yields (completed process, env for later commands, paths)."""
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    temp = Path(tempfile.gettempdir()) / f"alignx-readme-{os.getpid()}"  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE",
                                                            "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               PYTHONUNBUFFERED="1")
    script = localize(readme_local_blocks(), temp, run_dir)
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=420)
        after = dict(env, RAY_AUTH_MODE="token", RAY_ADDRESS=f"http://127.0.0.1:{DASHBOARD}")
        yield r, after, run_dir, script
    finally:
        _stop_cluster(temp)


def _alignx(argv: list[str], env: dict[str, str], timeout: int = 300):
    return subprocess.run([str(Path(sys.executable).parent / "alignx"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_readme_block_submits_prepare_and_lists_it(readme_cluster):
    r, _, run_dir, _ = readme_cluster
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert re.search(r"\[alignx\] job raysubmit_\w+ \(prepare\) SUCCEEDED in [\d.]+ s", r.stdout)
    for axis in AXES:  # the stage really ran on the cluster and wrote where --run-dir said
        assert (run_dir / "data" / axis.value / "manifest.json").is_file(), axis
        assert f"prepared {axis.value}" in r.stdout
    table = r.stdout[r.stdout.index("SUBMISSION ID"):].splitlines()
    assert re.match(r"raysubmit_\w+\s+SUCCEEDED\s+prepare\s", table[1]), table


def test_failing_stage_reports_failed_and_exits_nonzero(readme_cluster, tmp_path):
    r, env, _, script = readme_cluster
    assert r.returncode == 0
    submit = next(ln for ln in script.splitlines() if ln.startswith("alignx submit prepare"))
    argv = shlex.split(submit)[1:]
    empty = tmp_path / "no-data"
    empty.mkdir()
    argv = [f"data.data_dir={empty}" if a.startswith("data.data_dir=") else a for a in argv]
    argv[argv.index("--run-dir") + 1] = str(tmp_path / "failed-run")
    f = _alignx(argv, env)
    assert f.returncode == 1, f.stdout[-3000:] + f.stderr[-2000:]
    last = f.stderr.strip().splitlines()[-1]
    assert re.match(r"error: job raysubmit_\w+ \(prepare\) FAILED in [\d.]+ s: .*exit code 2 "
                    r"-- error: .*no alpaca data", last), last
    assert "Traceback" not in f.stderr
    failed_id = re.search(r"job (raysubmit_\w+)", last).group(1)

    listing = _alignx(["jobs", "--limit", "5"], env)  # the README's listing, via RAY_ADDRESS
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    assert rows[0].split()[:3] == [failed_id, "FAILED", "prepare"]  # newest first
    assert any(row.split()[1:3] == ["SUCCEEDED", "prepare"] for row in rows[1:])

    logs = _alignx(["jobs", "logs", failed_id], env)
    assert logs.returncode == 0 and "no alpaca data" in logs.stdout


def test_token_auth_is_enforced(readme_cluster):
    _, env, _, _ = readme_cluster
    wrong = _alignx(["jobs"], dict(env, RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith(f"error: the Ray cluster at http://127.0.0.1:{DASHBOARD} "
                                   "refused the token"), wrong.stderr
    off = _alignx(["jobs"], dict(env, RAY_AUTH_MODE="disabled"))
    assert off.returncode == 2 and "requires a token" in off.stderr, off.stderr


def test_no_wait_returns_the_id_and_the_job_can_be_stopped(readme_cluster, tmp_path):
    r, env, _, script = readme_cluster
    assert r.returncode == 0
    submit = next(ln for ln in script.splitlines() if ln.startswith("alignx submit prepare"))
    argv = shlex.split(submit)[1:]
    argv[argv.index("--run-dir") + 1] = str(tmp_path / "run")
    sub = _alignx([*argv, "--no-wait", "--submission-id", "alignx-readme-nowait"], env)
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.strip().splitlines()[-1] == "alignx-readme-nowait"
    stop = _alignx(["jobs", "stop", "alignx-readme-nowait"], env)
    assert stop.returncode == 0, stop.stderr
    # a 3-second job may finish before the stop arrives: either way it ends, and says which
    assert re.match(r"alignx-readme-nowait: (stop requested|already finished) \(status \w+\)",
                    stop.stdout), stop.stdout
    again = _alignx([*argv, "--no-wait", "--submission-id", "alignx-readme-nowait"], env)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert again.stderr.strip().splitlines() == [
        "error: http://127.0.0.1:8400: Request failed with status code 500: ValueError: Job with "
        "submission_id alignx-readme-nowait already exists. Please use a different submission_id"]
