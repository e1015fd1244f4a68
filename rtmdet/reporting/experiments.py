"""Every run to compare: HEAD, each DVC experiment, and the workspace, read straight from git.

Why git and not `dvc exp show`: the report runs as a DVC stage. In the workspace (`dvc repro`,
`dvc exp run`) `dvc exp show --json` does answer from inside a stage, but a `--temp` or queued
experiment runs in a standalone clone under .dvc/tmp/exps that holds none of the experiment refs,
so there it sees only its own baseline. Git reads need no DVC lock, work in every mode (the refs
come from $DVC_ROOT, which DVC points at the parent repository) and take milliseconds.

An experiment is a commit under refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; like every commit
it holds params.yaml and the metrics files that dvc.yaml declares with cache: false.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rtmdet.errors import DataError
from rtmdet.reporting.inputs import EVALUATE, VERIFY, parse_json

_EXP_REF = re.compile(r"^refs/exps/(?P<a>[0-9a-f]{2})/(?P<b>[0-9a-f]{38,62})/(?P<name>[^/]+)$")
WORKSPACE = "workspace"


@dataclass
class Run:
    """One row of the comparison: its name, its flat params and its evaluate / verify metrics."""

    name: str
    rev: str  # short commit, or "workspace"
    kind: str  # "baseline", "experiment" or "workspace"
    params: dict[str, Any]  # "section.key" -> value
    evaluate: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    baseline: str | None = None  # an experiment's baseline commit (short)
    current: bool = False  # the run the reports were written for
    notes: list[str] = field(default_factory=list)


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params as {"section.key": value}; lists stay values."""
    if not isinstance(params, dict):
        return {prefix: params} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def dvc_context() -> tuple[Path | None, str | None]:
    """(the repository holding the experiment refs, the running experiment's name) from the
    variables DVC sets for a stage; (None, None) outside DVC."""
    root = os.environ.get("DVC_ROOT")
    return (Path(root) if root else None), os.environ.get("DVC_EXP_NAME") or None


def collect_runs(params_file: Path, reports: Path, project: Path | None = None,
                 exp_repo: Path | None = None, run_name: str | None = None) -> tuple[list[Run], list[str]]:  # fmt: skip
    """The workspace (params_file and the metrics under reports, this run) plus HEAD and every
    experiment of the git repository `exp_repo` (default: `project`, default: the current folder).
    Returns the runs, workspace last, and notes on what could not be read."""
    project = Path(project or Path.cwd()).resolve()
    workspace = Run(run_name or WORKSPACE, WORKSPACE, WORKSPACE, _read_params(Path(params_file)),
                    _read_workspace_json(Path(reports) / EVALUATE), _read_workspace_json(Path(reports) / VERIFY),
                    current=True)  # fmt: skip
    files = (Path(params_file), Path(reports) / EVALUATE, Path(reports) / VERIFY)
    try:  # where the files are inside the project, hence in its commits
        rel = [f.resolve().relative_to(project).as_posix() for f in files]
    except ValueError:
        return [workspace], [f"Only the current run: `{reports}` or `{params_file}` is outside {project}."]
    try:
        runs = _committed_runs(Path(exp_repo or project), *rel)
    except GitUnavailable as exc:
        return [workspace], [f"Only the current run: {exc}."]
    return runs + [workspace], []


class GitUnavailable(Exception):
    """No git, or not a git repository: the comparison falls back to the current run."""


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(["git", *args], cwd=repo, input=stdin, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitUnavailable(f"git could not run ({exc})") from None
    if proc.returncode:
        raise GitUnavailable(f"`git {args[0]}` failed in {repo}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _committed_runs(repo: Path, params_rel: str, evaluate_rel: str, verify_rel: str) -> list[Run]:
    """HEAD and each experiment ref as runs, oldest experiment first."""
    prefix = _git(repo, "rev-parse", "--show-prefix").decode().strip()  # the project inside the git tree
    commits: list[tuple[str, str, str, str | None]] = []  # sha, name, kind, baseline
    head = _git(repo, "rev-parse", "HEAD").decode().strip() if _has_head(repo) else ""
    if head:
        commits.append((head, _commit_name(repo, head), "baseline", None))
    refs = _git(repo, "for-each-ref", "--sort=committerdate", "--format=%(objectname) %(refname)", "refs/exps")
    seen = {head}
    for line in refs.decode().splitlines():
        sha, ref = line.split(" ", 1)
        match = _EXP_REF.match(ref)
        if match and sha not in seen:  # skips DVC's working refs (exec/, celery/, stash, ...)
            seen.add(sha)
            commits.append((sha, match["name"], "experiment", (match["a"] + match["b"])[:7]))
    specs = [f"{sha}:{prefix}{rel}" for sha, *_ in commits for rel in (params_rel, evaluate_rel, verify_rel)]
    blobs = _cat_files(repo, specs)
    runs = []
    for i, (sha, name, kind, baseline) in enumerate(commits):
        params, evaluate, verify = blobs[3 * i: 3 * i + 3]
        run = Run(name, sha[:7], kind, {}, baseline=baseline)
        run.params = _parse_params(params, f"{name}:{params_rel}", run.notes)
        run.evaluate = _parse_metrics(evaluate, f"{name}:{evaluate_rel}", run.notes)
        run.verify = _parse_metrics(verify, f"{name}:{verify_rel}", run.notes)
        runs.append(run)
    return runs


def _commit_name(repo: Path, sha: str) -> str:
    """The branch checked out, else a branch or tag at `sha` (`dvc exp run` detaches HEAD while
    it runs), else the short commit, as `dvc exp show` names it."""
    for args in (["symbolic-ref", "--short", "-q", "HEAD"],
                 ["for-each-ref", "--points-at", sha, "--format=%(refname:short)", "refs/heads", "refs/tags"]):
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    return sha[:7]


def _has_head(repo: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo,
                          capture_output=True).returncode == 0  # fmt: skip


def _cat_files(repo: Path, specs: list[str]) -> list[bytes | None]:
    """The contents of `rev:path` objects in one `git cat-file --batch` call; None where missing."""
    if not specs:
        return []
    out = _git(repo, "cat-file", "--batch", stdin="".join(s + "\n" for s in specs).encode())
    blobs: list[bytes | None] = []
    pos = 0
    for _ in specs:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            blobs.append(out[pos: pos + size])
            pos += size + 1  # the content is followed by a newline
        else:  # "<spec> missing", or a tree / ambiguous name
            blobs.append(None)
    return blobs


def _parse_params(blob: bytes | None, where: str, notes: list[str]) -> dict[str, Any]:
    if blob is None:
        notes.append(f"{where}: not in the commit")
        return {}
    try:
        return flatten(yaml.safe_load(blob) or {})
    except yaml.YAMLError:
        notes.append(f"{where}: not valid YAML")
        return {}


def _parse_metrics(blob: bytes | None, where: str, notes: list[str]) -> dict[str, Any] | None:
    if blob is None:
        return None
    try:
        data = parse_json(blob, where)
    except DataError as exc:
        notes.append(str(exc))
        return None
    return data if isinstance(data, dict) else None


def _read_params(path: Path) -> dict[str, Any]:
    try:
        return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except FileNotFoundError:
        raise DataError(f"{path}: params file not found") from None
    except yaml.YAMLError:
        raise DataError(f"{path}: not valid YAML") from None


def _read_workspace_json(path: Path) -> dict[str, Any] | None:
    try:
        data = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, DataError):  # missing or broken: the README says why; here it is a blank cell
        return None
    return data if isinstance(data, dict) else None
