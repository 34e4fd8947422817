"""The bad-input matrix: every wrong file, config, data set or run folder fails the same way.

Each case breaks one thing in a small hand-made project (``test_reliability.make_project``: a
TinyViT base, two experts, heads and image folders, with a config using paths relative to it),
runs one ``adamerge`` command in-process (the code path of the command line) and asserts that

* the exit status is 1,
* stderr has exactly one non-empty line, ``adamerge CMD: error: ...``, naming the culprit (file,
  key, parameter, value, folder or pid: the case's fragments), with no traceback,
* nothing was written or changed: the case's folder (project, run folder, working directory)
  holds the same files, with the same sizes and modification times, as before the command: no
  checkpoint, no results, predictions or export file, no ``.tmp`` stray, no ``config.yaml`` copy
  (written only once a run has started: ``adamerge.commands.fit.DeferredSaveConfig``).

Only the run lock needs a second process: a small Python process (no torch) that holds the lock
of a running ``fit``, or is killed holding it; everything else runs in this one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from adamerge.commands.main import main
from adamerge.io.checkpoints import load_state_dict, save_state_dict
from adamerge.io.run_checkpoint import LOCK_NAME
from adamerge.suites.synthetic import TinyViT
from test_reliability import ARCH, make_project, write_images

ROOT_USER = os.geteuid() == 0  # chmod does not stop root: such cases use a file where a folder belongs


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One project for all cases; each case works on its own copy."""
    return make_project(tmp_path_factory.mktemp("template") / "project").parent.parent


@pytest.fixture(scope="module")
def trained(template, tmp_path_factory) -> Path:
    """A good checkpoint of the template's pool (2 steps), for the cases that need one.

    Its fit starts in a folder holding the lock file of a killed run (a stale lock, as SIGKILL
    leaves it), which it must take over: ``test_stale_lock_of_a_dead_run_is_taken_over`` checks
    the outcome.
    """
    out = tmp_path_factory.mktemp("trained")
    lock = out / "checkpoints" / LOCK_NAME
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()  # the file stays, nobody holds it
    proc.wait()
    assert lock.exists()
    code = main(["fit", "--config", str(template / "configs/run.yaml"), "--trainer.default_root_dir", str(out)])
    assert code == 0
    return out / "checkpoints/last.ckpt"


@dataclass
class Case:
    """What one case runs: ``root`` is its folder (project/, run/; also the working directory)."""
    root: Path
    trained: Path
    command: str = "fit"
    extra: list[str] = field(default_factory=list)
    argv: list[str] | None = None  # the whole command line, for commands without --config/--trainer
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    never: list[Path] = field(default_factory=list)  # files that running anything from the input would create

    @property
    def project(self) -> Path:
        return self.root / "project"

    @property
    def weights(self) -> Path:
        return self.project / "weights"

    @property
    def config(self) -> Path:
        return self.project / "configs/run.yaml"

    @property
    def out(self) -> Path:
        return self.root / "run"

    def edit_config(self, change: Callable[[dict], None]) -> None:
        cfg = yaml.safe_load(self.config.read_text())
        change(cfg)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def use_expert_file(self, task: str, name: str) -> Path:
        """Point the config's expert ``task`` at ``weights/name`` (returned)."""
        self.edit_config(lambda c: c["model"]["pool"]["init_args"]["experts"].__setitem__(
            task, f"../weights/{name}"))
        return self.weights / name

    def checkpoint(self, name: str = "given.ckpt") -> Path:
        """A copy of the good checkpoint in the case's folder."""
        path = self.root / name
        shutil.copy(self.trained, path)
        return path

    def command_line(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        return [self.command, "--config", str(self.config), "--trainer.default_root_dir", str(self.out),
                *self.extra]


def poison(path: Path, key: str, value: float) -> None:
    """Write ``value`` into one entry of parameter ``key`` of a safetensors file."""
    state = dict(load_state_dict(path))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_state_dict(state, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def random_bytes(path: Path, n: int = 4096) -> None:
    path.write_bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8).numpy().tobytes())


class Payload:
    """A pickled callable: loading it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def as_torch_file(case: Case, task: str) -> Path:
    """Expert ``task`` saved as a torch file (``torch.save``, zip format) and used by the config."""
    state = load_state_dict(case.weights / f"{task}.safetensors")
    path = case.use_expert_file(task, f"{task}.pt")
    torch.save(state, path)
    return path


def unwritable_folder(path: Path) -> None:
    """A folder nothing can be written into: read-only, or (as root, whom chmod does not stop) a
    regular file where the folder should be."""
    if ROOT_USER:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a file, not a folder\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o500)


# What RunLock.acquire does: an O_EXCL file, an exclusive flock kept while the process lives, a JSON record.
LOCK_HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys
    path = sys.argv[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": "2026-01-01 00:00:00"}).encode() + b"\\n")
    print("locked", flush=True)
    sys.stdin.read()
""")


def hold_lock(case: Case) -> int:
    """Another process holding the run lock of the case's run folder (as a running fit does)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(case.out / "checkpoints" / LOCK_NAME)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        proc.stdin.close()
        proc.wait(timeout=30)
    case.cleanup.append(stop)
    assert proc.stdout.readline().strip() == "locked"
    return proc.pid


# --------------------------------------------------------------------------------- cases
CASES: dict[str, Callable[[Case], list[str]]] = {}


def case(name: str):
    def register(build: Callable[[Case], list[str]]):
        CASES[name] = build
        return build
    return register


# -- weight files
@case("base-truncated-safetensors")
def _(c: Case) -> list[str]:
    truncate(c.weights / "base.safetensors")
    return ["base.safetensors: cannot read checkpoint: truncated or corrupt file (safetensors: cut short:"]


@case("expert-random-bytes-safetensors")
def _(c: Case) -> list[str]:
    random_bytes(c.weights / "b.safetensors")
    return ["b.safetensors: cannot read checkpoint: truncated or corrupt file (safetensors:"]


@case("heads-empty-file")
def _(c: Case) -> list[str]:
    (c.weights / "heads.safetensors").write_bytes(b"")
    return ["heads.safetensors: cannot read checkpoint: truncated or corrupt file (empty, 0 bytes)"]


@case("expert-truncated-pt")
def _(c: Case) -> list[str]:
    truncate(as_torch_file(c, "a"), 0.7)
    return ["a.pt: cannot read checkpoint: truncated or corrupt file (torch zip archive cut short"]


@case("expert-random-bytes-pt")
def _(c: Case) -> list[str]:
    random_bytes(c.use_expert_file("a", "a.pt"))
    return ["a.pt: cannot read checkpoint: truncated or corrupt file (not a torch file"]


@case("expert-pickled-pt")
def _(c: Case) -> list[str]:
    path = as_torch_file(c, "a")
    torch.save({"state_dict": load_state_dict(path), "extra": Payload(c.root / "pwned")}, path)
    c.never.append(c.root / "pwned")
    return ["a.pt: cannot read checkpoint: it holds pickled objects (", "allow_pickle"]


@case("base-of-another-architecture")
def _(c: Case) -> list[str]:
    save_state_dict(TinyViT(**{**ARCH, "dim": 24}).state_dict(), c.weights / "base.safetensors")
    return ["base.safetensors does not fit TinyViT: shape mismatch ", ": file (24,", "vs model (16,", "more)"]


@case("base-missing-and-unexpected-keys")
def _(c: Case) -> list[str]:
    state = dict(load_state_dict(c.weights / "base.safetensors"))
    del state["cls"]
    state["adapter.weight"] = torch.zeros(2, 2)
    save_state_dict(state, c.weights / "base.safetensors")
    return ["base.safetensors does not fit TinyViT: missing keys [cls]; unexpected keys [adapter.weight]"]


@case("expert-of-another-architecture")
def _(c: Case) -> list[str]:
    save_state_dict(TinyViT(**{**ARCH, "dim": 24}).state_dict(), c.weights / "b.safetensors")
    return ["fine-tuned model 'b' does not match base", "expected (16,"]


@case("expert-nan")
def _(c: Case) -> list[str]:
    key = [k for k in load_state_dict(c.weights / "b.safetensors") if k.endswith("weight")][1]
    poison(c.weights / "b.safetensors", key, float("nan"))
    return [f"b.safetensors: '{key}' holds non-finite values (1 NaN, 0 inf of"]


@case("base-inf")
def _(c: Case) -> list[str]:
    poison(c.weights / "base.safetensors", "cls", float("inf"))
    return ["base.safetensors: 'cls' holds non-finite values (0 NaN, 1 inf of"]


@case("head-nan")
def _(c: Case) -> list[str]:
    poison(c.weights / "heads.safetensors", "b.weight", float("-inf"))
    return ["heads.safetensors: 'b.weight' holds non-finite values (0 NaN, 1 inf of"]


@case("heads-without-a-task")
def _(c: Case) -> list[str]:
    heads = load_state_dict(c.weights / "heads.safetensors")
    save_state_dict({"a.weight": heads["a.weight"]}, c.weights / "heads.safetensors")
    return ["heads.safetensors: no head for task 'b'"]


@case("head-class-count-vs-data")
def _(c: Case) -> list[str]:
    write_images(c.project / "data/b/test/c2", 4, seed=99)
    return ["task 'b': the 'test' split has 3 classes but the head has 2 outputs"]


# -- checkpoints given with --ckpt_path
@case("ckpt-truncated")
def _(c: Case) -> list[str]:
    truncate(c.checkpoint())
    c.command, c.extra = "validate", ["--ckpt_path", str(c.root / "given.ckpt")]
    return ["given.ckpt: cannot read checkpoint: truncated or corrupt file (torch zip archive cut short"]


@case("ckpt-random-bytes")
def _(c: Case) -> list[str]:
    random_bytes(c.root / "given.ckpt")
    c.command, c.extra = "test", ["--ckpt_path", str(c.root / "given.ckpt")]
    return ["given.ckpt: cannot read checkpoint: truncated or corrupt file (not a torch file"]


@case("ckpt-empty")
def _(c: Case) -> list[str]:
    (c.root / "given.ckpt").write_bytes(b"")
    c.command, c.extra = "test", ["--ckpt_path", str(c.root / "given.ckpt")]
    return ["given.ckpt: cannot read checkpoint: truncated or corrupt file (empty, 0 bytes)"]


@case("ckpt-online-state")
def _(c: Case) -> list[str]:
    state = {"learned": {}, "optimizer": {}, "step": 2, "rows": 4, "tasks": ["a", "b"], "seed": 0}
    torch.save(state, c.root / "state.pt")
    c.command, c.extra = "test", ["--ckpt_path", str(c.root / "state.pt")]
    return ["state.pt: an `adamerge online` state (state.pt), not a run checkpoint"]


@case("ckpt-expert-weights")
def _(c: Case) -> list[str]:
    torch.save({"w": torch.zeros(2), "b": torch.zeros(2)}, c.root / "expert.pt")
    c.command, c.extra = "validate", ["--ckpt_path", str(c.root / "expert.pt")]
    return ["expert.pt: weights (a state dict of 2 tensors, e.g. an expert), not a run checkpoint"]


@case("ckpt-export-folder")
def _(c: Case) -> list[str]:
    (c.root / "exported").mkdir()
    (c.root / "exported/export.json").write_text("{}")
    c.command, c.extra = "test", ["--ckpt_path", str(c.root / "exported")]
    return ["exported: a folder (an `adamerge export` folder: use it with `adamerge predict --export`)"]


@case("max-steps-not-positive")
def _(c: Case) -> list[str]:
    c.extra = ["--trainer.max_steps", "-1"]
    return ["trainer.max_steps must be a positive number of steps, got -1"]


@case("ckpt-pickled")
def _(c: Case) -> list[str]:
    ckpt = torch.load(c.trained, weights_only=True)
    ckpt["payload"] = Payload(c.root / "pwned")
    torch.save(ckpt, c.root / "given.ckpt")
    c.command, c.extra = "validate", ["--ckpt_path", str(c.root / "given.ckpt")]
    c.never.append(c.root / "pwned")
    return ["given.ckpt: cannot read checkpoint: it holds pickled objects (io.open)",
            "never loads pickled objects"]


@case("ckpt-missing")
def _(c: Case) -> list[str]:
    c.command, c.extra = "validate", ["--ckpt_path", str(c.root / "nope.ckpt")]
    return ["nope.ckpt: no such checkpoint file"]


@case("resume-with-other-settings")
def _(c: Case) -> list[str]:
    c.checkpoint()  # the trained run: layer-wise
    c.extra = ["--ckpt_path", str(c.root / "given.ckpt"), "--model.granularity", "taskwise"]
    return ["given.ckpt was made with other settings (model.granularity: the checkpoint's 'layerwise', "
            "this command's 'taskwise')", "another --trainer.default_root_dir"]


@case("resume-last-with-other-settings")
def _(c: Case) -> list[str]:
    (c.out / "checkpoints").mkdir(parents=True)
    shutil.copy(c.trained, c.out / "checkpoints/last.ckpt")
    c.extra = ["--ckpt_path", "last", "--model.lr", "0.5"]
    return ["last.ckpt was made with other settings (model.lr: the checkpoint's", "this command's 0.5"]


@case("new-fit-into-a-finished-run")
def _(c: Case) -> list[str]:
    (c.out / "checkpoints").mkdir(parents=True)
    shutil.copy(c.trained, c.out / "checkpoints/last.ckpt")
    return ["holds a run at step 2: continue it with --ckpt_path last, start over with --start_over true"]


@case("ckpt-last-with-nothing-to-continue")
def _(c: Case) -> list[str]:
    c.extra = ["--ckpt_path", "last"]
    return ["--ckpt_path last: no last.ckpt in", "nothing to continue"]


@case("learning-rate-not-positive")
def _(c: Case) -> list[str]:
    c.extra = ["--model.lr", "-0.01"]
    return ["model.lr must be > 0, got -0.01"]


@case("ckpt-of-another-pool")
def _(c: Case) -> list[str]:
    c.checkpoint()
    c.edit_config(lambda cfg: cfg["model"]["pool"]["init_args"].__setitem__(
        "experts", dict(reversed(list(cfg["model"]["pool"]["init_args"]["experts"].items())))))
    c.command, c.extra = "test", ["--ckpt_path", str(c.root / "given.ckpt")]
    # (the message says "checkpoint", not the file: adamerge/methods/adamerging.py on_load_checkpoint)
    return ["was made on a different model pool: tasks ['a', 'b'] (checkpoint) vs ['b', 'a'] (now)"]


# -- interrupted runs
@case("resume-from-truncated-last")
def _(c: Case) -> list[str]:
    (c.out / "checkpoints").mkdir(parents=True)
    shutil.copy(c.trained, c.out / "checkpoints/last.ckpt")
    truncate(c.out / "checkpoints/last.ckpt", 0.6)
    c.extra = ["--ckpt_path", "last"]
    return ["checkpoints/last.ckpt: cannot read checkpoint: truncated or corrupt file "
            "(torch zip archive cut short"]


@case("resume-on-another-pool")
def _(c: Case) -> list[str]:
    (c.out / "checkpoints").mkdir(parents=True)
    shutil.copy(c.trained, c.out / "checkpoints/last.ckpt")
    other = TinyViT(**ARCH)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    save_state_dict(other.state_dict(), c.weights / "a.safetensors")
    c.extra = ["--ckpt_path", "last"]
    return ["was made on a different model pool: weights differ for tasks ['a']"]


@case("second-fit-in-a-running-folder")
def _(c: Case) -> list[str]:
    pid = hold_lock(c)
    return [f"{c.out / 'checkpoints'} is in use by another adamerge fit (pid {pid}, since 2026-01-01",
            f"delete {c.out / 'checkpoints' / LOCK_NAME}"]


@case("second-fit-in-a-running-folder-with-tensorboard")
def _(c: Case) -> list[str]:
    pid = hold_lock(c)
    c.extra = ["--trainer.logger", "true"]  # refused before TensorBoard makes lightning_logs/version_0
    return [f"{c.out / 'checkpoints'} is in use by another adamerge fit (pid {pid}"]


# -- configs
@case("config-missing")
def _(c: Case) -> list[str]:
    c.config.unlink()
    return ["run.yaml"]


def misspell(c: Case, old: str, new: str) -> int:
    """Rename the config key ``old:`` (its first occurrence) to ``new:``; its 1-based line."""
    lines = c.config.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{old}:"))
    lines[n] = lines[n].replace(f"{old}:", f"{new}:", 1)
    c.config.write_text("\n".join(lines) + "\n")
    return n + 1


@case("config-key-typo")
def _(c: Case) -> list[str]:
    line = misspell(c, "batch_size", "batchsize")
    return [f"run.yaml, line {line}: unknown key data.batchsize; did you mean data.batch_size?"]


@case("config-key-typo-in-init-args")
def _(c: Case) -> list[str]:
    line = misspell(c, "experts", "expert")
    return [f"run.yaml, line {line}: unknown key model.pool.expert; did you mean model.pool.experts?"]


@case("command-line-key-typo")
def _(c: Case) -> list[str]:
    c.extra = ["--model.priorr", "0.2"]
    return ["unknown key model.priorr (command line: --model.priorr); did you mean model.prior?"]


@case("prior-outside-the-clamp")
def _(c: Case) -> list[str]:
    c.extra = ["--model.prior", "-1"]
    return ["model.prior must be in [0, 1] while model.clamp is true", "got -1.0"]


@case("trim-above-one")
def _(c: Case) -> list[str]:
    c.extra = ["--model.trim", "1.5"]
    return ["model.trim must be in (0, 1]", "got 1.5"]


@case("eval-batch-size-zero")
def _(c: Case) -> list[str]:
    c.extra = ["--data.eval_batch_size", "0"]
    return ["data.eval_batch_size must be >= 1, got 0"]


@case("val-check-interval-zero")
def _(c: Case) -> list[str]:
    c.extra = ["--trainer.val_check_interval", "0"]
    return ["trainer.val_check_interval must be a positive number of steps, got 0"]


@case("config-yaml-syntax-error")
def _(c: Case) -> list[str]:
    lines = c.config.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip() == "batch_size: 2")
    lines[n] = lines[n].replace("batch_size: 2", "batch_size: [2")
    c.config.write_text("\n".join(lines) + "\n")
    return ["run.yaml: not valid YAML", f"(line {n + 2}, column"]  # where the parser stops: the next line


@case("config-unknown-key")
def _(c: Case) -> list[str]:
    c.edit_config(lambda cfg: cfg["data"].__setitem__("batch_sise", 4))
    return ["batch_sise"]


@case("config-wrong-type")
def _(c: Case) -> list[str]:
    c.edit_config(lambda cfg: cfg["data"].__setitem__("batch_size", "many"))
    return ["batch_size", "many"]


@case("config-python-tag")
def _(c: Case) -> list[str]:
    c.config.write_text(c.config.read_text().replace(
        "seed_everything: 0", f"seed_everything: !!python/object/apply:os.system ['touch {c.root / 'pwned'}']"))
    c.never.append(c.root / "pwned")
    return ["python/object/apply"]


@case("unknown-task-name")
def _(c: Case) -> list[str]:
    c.extra = ["--data.source.init_args.tasks", "[a, bb]"]
    return ["unknown task 'bb'", "did you mean 'b'?"]


@case("missing-expert-file")
def _(c: Case) -> list[str]:
    (c.weights / "b.safetensors").unlink()
    return ["model.pool.experts", "b.safetensors", "does not exist"]


# -- data (an empty split and an undecodable image: tests/test_reliability.py, with the same checks)
@case("data-folder-missing")
def _(c: Case) -> list[str]:
    shutil.rmtree(c.project / "data")
    return ["data.source.root: Directory does not exist:", "data'"]


# -- outputs
@case("run-folder-not-writable")
def _(c: Case) -> list[str]:
    unwritable_folder(c.out)
    return [str(c.out)]


@case("export-to-an-existing-file")
def _(c: Case) -> list[str]:
    given = c.checkpoint()
    (c.root / "exported").write_text("not a folder\n")
    c.argv = ["export", "--config", str(c.config), "--ckpt_path", str(given), "--out", str(c.root / "exported")]
    return ["exported"]


@case("export-into-an-unwritable-folder")
def _(c: Case) -> list[str]:
    given = c.checkpoint()
    unwritable_folder(c.root / "exported")
    c.argv = ["export", "--config", str(c.config), "--ckpt_path", str(given), "--out", str(c.root / "exported")]
    return ["exported"]


@case("predict-unknown-task")
def _(c: Case) -> list[str]:
    given = c.checkpoint()
    c.argv = ["predict", "--config", str(c.config), "--ckpt_path", str(given), "--task", "bb", "--split", "test",
              "--out", str(c.root / "pred.csv"), "--no-progress"]
    return ["unknown task 'bb'", "did you mean 'b'?"]


@case("predict-images-folder-missing")
def _(c: Case) -> list[str]:
    given = c.checkpoint()
    c.argv = ["predict", "--config", str(c.config), "--ckpt_path", str(given), "--task", "a",
              "--images", str(c.root / "photos"), "--out", str(c.root / "pred.csv"), "--no-progress"]
    return ["photos: --images must be a folder of image files"]


# ---------------------------------------------------------------------------------- test
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: size and modification time of files."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def stderr_lines(err: str) -> list[str]:
    """Non-empty lines of stderr, without progress bars (carriage-return updates)."""
    lines = []
    for line in err.splitlines():
        line = line.rsplit("\r", 1)[-1].strip()
        if line and not ("it/s]" in line or "s/it]" in line):
            lines.append(line)
    return lines


def run_case(name: str, c: Case, capsys, monkeypatch) -> tuple[int, str, list[str], dict]:
    """Build case ``name`` in ``c.root``, run its command there; (exit code, stderr, fragments, changes)."""
    root = c.root
    try:
        fragments = CASES[name](c)
        before = snapshot(root)
        monkeypatch.chdir(root)  # anything written relative to the working directory is seen
        capsys.readouterr()
        code = main(c.command_line())
        err = capsys.readouterr().err
        after = snapshot(root)
    finally:
        for undo in c.cleanup:
            undo()
        if not ROOT_USER:
            for p in root.rglob("*"):  # let pytest remove what the case made read-only
                if p.is_dir():
                    p.chmod(0o755)
    changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return code, err, fragments, changed


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, template, trained, tmp_path, capsys, monkeypatch):
    shutil.copytree(template, tmp_path / "project")
    c = Case(tmp_path, trained)
    code, err, fragments, changed = run_case(name, c, capsys, monkeypatch)
    command = c.command_line()[0]
    lines = stderr_lines(err)
    assert code == 1, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"adamerge {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err
    assert not [p for p in c.never if p.exists()], "something in the input was run"
    strays = dict(changed)
    assert not strays, strays


def test_matrix_size():
    assert len(CASES) >= 25, len(CASES)


def test_failed_fit_writes_no_config_copy(template, trained, tmp_path, capsys, monkeypatch):
    """A refused second fit leaves the running run's config.yaml as it was (and, in general, a fit
    refused at set-up writes no config copy)."""
    shutil.copytree(template, tmp_path / "project")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text("# the running run's config\n")
    code, err, fragments, changed = run_case("second-fit-in-a-running-folder", Case(tmp_path, trained),
                                             capsys, monkeypatch)
    assert code == 1 and "is in use by another adamerge fit" in err, err[-3000:]
    assert not changed, changed


def test_yaml_error_names_the_file(template, trained, tmp_path, capsys, monkeypatch):
    shutil.copytree(template, tmp_path / "project")
    code, err, fragments, changed = run_case("config-yaml-syntax-error", Case(tmp_path, trained), capsys,
                                             monkeypatch)
    assert code == 1 and "run.yaml" in err, err[-3000:]


def test_stale_lock_of_a_dead_run_is_taken_over(trained):
    """The fit of the ``trained`` fixture started over a killed run's lock: it ran, and removed the lock."""
    folder = trained.parent
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
