"""launch/tpu/*.sh --dry-run against the README: every command of the README's Cloud TPU section
(its `export CRATE_...` settings, then create, setup, run, logs, stop, delete as printed there),
run with --dry-run and a `gcloud` on PATH that fails the test if anything calls it. The printed
gcloud commands must be the ones the README describes, the scripts they send to the workers
must pass `bash -n` and shellcheck, and the trainer command that run.sh starts on every worker
must carry the README's config and flags, which must parse on that config as
crate_jax.main parses them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest
from doc_utils import documentation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("create", "setup", "run", "logs", "stop", "delete")


def _section() -> str:
    text = documentation()  # the section lives in docs/scaling.md
    return re.split(r"\n#{1,2} ", text.split("## 5. A Cloud TPU slice", 1)[1], maxsplit=1)[0]


def _settings() -> dict[str, str]:
    """The README's `export CRATE_...=...` lines."""
    found = {}
    for line in _section().splitlines():
        if line.startswith("export "):
            for word in shlex.split(line, comments=True)[1:]:
                key, value = word.split("=", 1)
                found[key] = value
    return found


def _commands() -> list[str]:
    """Every `launch/tpu/*.sh ...` command of the section: in code blocks (with their
    continuation lines) and in inline code."""
    section = _section()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = block.replace("\\\n", " ")
        found += [line.strip() for line in joined.splitlines()
                  if line.strip().startswith("launch/tpu/")]
    found += re.findall(r"`(launch/tpu/[a-z]+\.sh[^`]*)`", section)
    return found


def _words(line: str) -> list[str]:
    """A line the scripts printed with printf %q, split into words as bash reads it."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """dry_run(COMMAND, **env) → the gcloud commands it printed (a list of words each; those
    under run.sh --recreate's '#   + ' too)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    called = bin_dir / "gcloud_was_called"
    (bin_dir / "gcloud").write_text(f"#!/bin/sh\necho \"$*\" >> {called}\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    settings = _settings()

    def run(command: str, **env: str) -> list[list[str]]:
        argv = shlex.split(command)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CRATE_")}
        environ.update(settings, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        out = subprocess.run(["bash", os.path.join(ROOT, argv[0]), *argv[1:], "--dry-run"],
                             cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert not called.exists(), f"{command} --dry-run called gcloud: {called.read_text()}"
        return [_words(m) for m in re.findall(r"^(?:#   )?\+ (.*)$", out.stdout, flags=re.M)]

    return run


def _remote(command: list[str]) -> str:
    """The script of a `gcloud ... ssh --command=SCRIPT`, checked with bash -n and shellcheck."""
    script = next(w for w in command if w.startswith("--command="))[len("--command="):]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert shutil.which("shellcheck"), "shellcheck is missing: pip install -r requirements.txt"
    check = subprocess.run(["shellcheck", "-s", "bash", "-"], input=script,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + script
    return script


def _ssh(name: str, worker: str) -> list[str]:
    s = _settings()
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--project={s['CRATE_PROJECT']}",
            f"--zone={s['CRATE_ZONE']}", f"--worker={worker}"]


def test_the_readme_runs_every_script():
    commands = _commands()
    assert {re.match(r"launch/tpu/([a-z]+)\.sh", c)[1] for c in commands} == set(SCRIPTS)
    assert {"CRATE_PROJECT", "CRATE_ZONE", "CRATE_NAME", "CRATE_ACCELERATOR", "CRATE_WORKDIR",
            "CRATE_CONFIG"} <= _settings().keys()


def test_create_and_delete(dry_run):
    s = _settings()
    name, where = s["CRATE_NAME"], [f"--project={s['CRATE_PROJECT']}", f"--zone={s['CRATE_ZONE']}"]
    (create,) = [c for c in _commands() if c.startswith("launch/tpu/create.sh")]
    assert "--spot" in create and "--queued" in create
    printed = dry_run(create)
    assert printed[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", name, *where,
                          f"--node-id={name}", f"--accelerator-type={s['CRATE_ACCELERATOR']}",
                          "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert printed[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", name,
                          *where, "--format=value(state.state)"]  # polled until ACTIVE
    (delete,) = [c for c in _commands() if c.startswith("launch/tpu/delete.sh")]
    assert dry_run(delete) == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", name, *where,
         "--format=value(name)"],  # is there a queued resource? (dry run: assumed not)
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *where, "--quiet"]]
    assert dry_run(delete, CRATE_QUEUED="1") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", name, *where, "--force",
         "--quiet"]]


def test_runtime_version_per_generation_as_the_readme_says(dry_run):
    text = " ".join(_section().split())
    pairs = re.findall(r"`([a-z0-9.-]+)` for (v[0-9a-z]+)", text)
    assert [gen for _, gen in pairs] == ["v4", "v5e", "v5p", "v6e"], pairs
    accelerator = {"v4": "v4-64", "v5e": "v5litepod-16", "v5p": "v5p-64", "v6e": "v6e-16"}
    for version, gen in pairs:
        (create,) = dry_run("launch/tpu/create.sh", CRATE_ACCELERATOR=accelerator[gen])
        assert create[3:5] == ["tpu-vm", "create"] and create[-1] == f"--version={version}"


def test_setup_installs_from_the_tarball_on_every_worker(dry_run):
    (setup,) = [c for c in _commands() if c.startswith("launch/tpu/setup.sh")]
    tarball = setup.split("--tarball=", 1)[1].split()[0]
    install, check = dry_run(setup)
    name = _settings()["CRATE_NAME"]
    assert install[:9] == check[:9] == _ssh(name, "all")
    script = _remote(install)
    assert f"gcloud storage cp {tarball} " in script
    assert '"$CRATE_VENV/bin/pip" install -q -r requirements.txt' in script
    assert "jax.device_count()" in _remote(check)


def _trainer(start_script: str) -> list[str]:
    """The trainer command inside the job script that run.sh writes on every worker."""
    job = start_script.split("<<'CRATE_JOB'\n", 1)[1].split("\nCRATE_JOB\n", 1)[0]
    subprocess.run(["bash", "-n"], input=job, text=True, check=True)
    (line,) = [x for x in job.splitlines() if x.startswith('PATH="$CRATE_VENV/bin:$PATH" ')]
    return _words(line.split(" ", 1)[1].rsplit(' >>"$log" 2>&1 &', 1)[0])


def _parse_flags(config: str, flags_: list[str]):
    """The config as crate_jax.main builds it from these flags."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["crate_jax.main", f"--config={config}", *flags_]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_run_starts_the_readme_trainer_command_on_every_worker(dry_run):
    s = _settings()
    runs = [c for c in _commands() if c.startswith("launch/tpu/run.sh")]
    assert len(runs) == 2 and "--recreate" in runs[1]
    for command in runs:
        flags_ = [w for w in shlex.split(command) if w.startswith("--config.")]
        printed = dry_run(command)
        assert printed[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", s["CRATE_NAME"],
                              f"--project={s['CRATE_PROJECT']}", f"--zone={s['CRATE_ZONE']}",
                              "--format=value(state)"]
        start = printed[-1]
        assert start[:9] == _ssh(s["CRATE_NAME"], "all")
        trainer = _trainer(_remote(start))
        assert trainer == ["env", "CRATE_DISTRIBUTED=1",
                           f"JAX_COMPILATION_CACHE_DIR={s['CRATE_WORKDIR']}/xla_cache", "python",
                           "-m", "crate_jax.main", f"--config={s['CRATE_CONFIG']}",
                           f"--workdir={s['CRATE_WORKDIR']}", *flags_]
        config = _parse_flags(os.path.join(ROOT, s["CRATE_CONFIG"]), trainer[8:])
        for flag in flags_:
            key, value = flag[len("--config."):].split("=", 1)
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (key, node, value)
    # --recreate also shows what it would do were the slice gone: delete, create, set up
    recreated = dry_run(runs[1])
    verbs = [w[3:5] for w in recreated[1:-1]]
    assert verbs == [["queued-resources", "delete"], ["queued-resources", "create"],
                     ["queued-resources", "describe"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert "--spot" in recreated[2]
    tarball = runs[1].split("--tarball=", 1)[1].split()[0]
    assert f"gcloud storage cp {tarball} " in _remote(recreated[4])


def test_logs_and_stop(dry_run):
    s = _settings()
    name, workdir = s["CRATE_NAME"], s["CRATE_WORKDIR"]
    logs = [c for c in _commands() if c.startswith("launch/tpu/logs.sh")]
    assert sorted(logs) == ["launch/tpu/logs.sh", "launch/tpu/logs.sh --from-bucket"]
    (follow,) = dry_run("launch/tpu/logs.sh")
    assert follow[:9] == _ssh(name, "0")
    assert 'tail -n 100 -F "$CRATE_LOGS/$CRATE_SESSION.log"' in _remote(follow)
    (every,) = dry_run("launch/tpu/logs.sh --worker=all")
    assert every[:9] == _ssh(name, "all")
    assert dry_run("launch/tpu/logs.sh --from-bucket") == [
        ["gcloud", "storage", "cat", f"{workdir}/logs/crate.worker0.log", "|", "tail", "-n",
         "100"]]
    stops = [c for c in _commands() if c.startswith("launch/tpu/stop.sh")]
    assert stops == ["launch/tpu/stop.sh"]
    (stop,) = dry_run(stops[0])
    assert stop[:9] == _ssh(name, "all")
    assert "\nsignal=TERM\n" in _remote(stop)
    (force,) = dry_run("launch/tpu/stop.sh --force")
    assert "\nsignal=KILL\n" in _remote(force)
