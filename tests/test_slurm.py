"""The SLURM path without SLURM: the recipe scripts run through stand-ins for sbatch, srun, scontrol and
torchrun, in a copy of the files a fresh clone has. About 1 min on 2 cores.

- sbatch is played by :func:`sbatch` here: it reads the script's #SBATCH header, opens the log file
  before the script runs (as SLURM does: no directory, no job and no log) and runs the script with
  the SLURM environment of that header.
- srun, scontrol and torchrun (``$PYTHON -m torch.distributed.run``) are shims that record their
  arguments; srun runs its command here and forwards signals to it like the real one; torchrun either
  only records, or starts a stand-in worker, or runs the real train.py on a tiny model.

What is compared is the recipe table (slurm/recipes.yaml through slurm/recipe.py), never a second
copy of its text. The time-limit path is tested end to end: SIGUSR1 to the batch shell reaches the
training process, which saves a complete checkpoint and exits; the job requeues itself; the next
start resumes from that checkpoint. The training side (anllm.train.preemption) is also tested in
process (checkpoint at the step of the signal, resume from it) and with two gloo ranks (a signal on
one rank stops both at the same step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "4242"


def _load_recipe_module():
    spec = importlib.util.spec_from_file_location("anllm_slurm_recipe", REPO / "slurm" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


recipe_mod = _load_recipe_module()
RECIPES = recipe_mod.load()


def header(script: Path) -> dict[str, str | bool]:
    """The #SBATCH options of a script, as sbatch reads them (up to the first command line)."""
    opts: dict[str, str | bool] = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            for item in line.split()[1:]:
                key, sep, value = item.lstrip("-").partition("=")
                opts[key] = value if sep else True
        elif line.strip() and not line.startswith("#"):
            break
    return opts


def as_strings(opts) -> dict[str, str | bool]:
    return {k: (v if v is True else str(v)) for k, v in opts.items() if v is not False and v is not None}


# --- the fresh clone and the stand-ins ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The files a fresh clone would have (tracked, plus new files git does not ignore) of what a job uses."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: cannot tell what a fresh clone holds")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                             "slurm", "slurm-logs", "conf", "src/anllm/conf", "train.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    root = tmp_path_factory.mktemp("clone") / "anllm"
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_symlink():  # conf -> src/anllm/conf (the configs ship inside the package)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), root / rel)
        elif src.is_file():  # a file deleted in this checkout stays listed until the deletion is committed
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    return root


SRUN = r'''
import json, os, signal, subprocess, sys
args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.environ["SHIM_LOG"] + "/srun.jsonl", "a") as f:
    f.write(json.dumps({"options": opts, "command": args}) + "\n")
env = dict(os.environ, SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_ID="0")
child = subprocess.Popen(args, env=env)
for sig in (signal.SIGUSR1, signal.SIGTERM):  # srun forwards signals to its tasks
    signal.signal(sig, lambda s, f: child.send_signal(s))
sys.exit(child.wait())
'''

SCONTROL = r'''
import os, signal, sys
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    print("localhost")
    sys.exit(0)
with open(os.environ["SHIM_LOG"] + "/scontrol.log", "a") as f:
    f.write(" ".join(args) + "\n")
if args[:1] == ["requeue"] and os.environ.get("FAKE_REQUEUE_KILLS") == "1":
    os.killpg(os.getpgid(0), signal.SIGKILL)  # SLURM ends the running job when it is requeued
'''

# $PYTHON: torchrun (`-m torch.distributed.run`) is faked; anything else runs the real interpreter.
FAKE_PYTHON = r'''
import json, os, signal, subprocess, sys
REAL = {real!r}
args = sys.argv[1:]
if args[:2] != ["-m", "torch.distributed.run"]:
    os.execv(REAL, [REAL, *args])
log = os.environ["SHIM_LOG"]
keys = ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM")
record = {{"argv": args[2:], "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
           "env": {{k: os.environ.get(k) for k in keys}}}}
with open(log + "/torchrun.jsonl", "a") as f:
    f.write(json.dumps(record) + "\n")
mode = os.environ.get("FAKE_TORCHRUN", "record")
if mode == "record":
    sys.exit(0)
train_args = args[args.index("train.py") + 1:]
if mode == "train":
    worker = [REAL, os.environ["TRAIN_DRIVER"], *train_args]
else:  # "worker" / "stubborn": a training process that saves on SIGUSR1 (or ignores it)
    worker = [REAL, "-c", {worker!r}, mode, log]
sys.exit(subprocess.Popen(worker).wait())  # a child of this "torchrun", as torchrun's workers are
'''

WORKER = r'''
import signal, sys, time
mode, log = sys.argv[1], sys.argv[2]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))  # over the "ignore" inherited from torchrun
open(log + "/worker.ready", "w").close()
deadline = time.time() + 60
while time.time() < deadline and not (got and mode == "worker"):
    time.sleep(0.01)
with open(log + "/worker.log", "a") as f:
    f.write(f"got {len(got)} SIGUSR1\n")
'''

# train.py with the preemption callback registered (a no-op once anllm.train.runner registers it).
DRIVER = r'''
import runpy, sys
import anllm.train as T
import anllm.train.runner as R
if not hasattr(R, "PreemptionCallback"):
    from anllm.train.preemption import PreemptionCallback
    run = T.run
    T.run = lambda cfg, callbacks=(): run(cfg, callbacks=[PreemptionCallback(), *callbacks])
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("shims")
    real = sys.executable
    files = {"srun": SRUN, "scontrol": SCONTROL, "python": FAKE_PYTHON.format(real=real, worker=WORKER)}
    for name, body in files.items():
        (bin_dir / name).write_text(f"#!{real}\n{body}")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "driver.py").write_text(DRIVER)
    return bin_dir


class Job:
    def __init__(self, proc: subprocess.Popen, log: Path, shim_log: Path):
        self.proc, self.log, self.shim_log = proc, log, shim_log

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the job did not end:\n" + self.output()[-3000:]) from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def records(self, name: str) -> list[dict]:
        path = self.shim_log / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def scontrol(self) -> list[str]:
        path = self.shim_log / "scontrol.log"
        return path.read_text().splitlines() if path.exists() else []


class SbatchRefused(RuntimeError):
    pass


# Variables a job reads: the test environment must not leak them in.
STREAM = {"RPJ_STREAM": "1"}  # the pretraining recipes read a local copy unless the stream is asked for
JOB_VARIABLES = ("EXTRA", "RECIPE", "RPJ_DIR", "RPJ_STREAM", "MAX_STEPS", "BASE", "LLAMA2_7B", "LLAMA2_13B", "PYTHON",
                 "GPUS_PER_NODE", "MASTER_PORT", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "REQUEUE_GRACE")


def sbatch(clone: Path, shims: Path, tmp: Path, script: str, *args: str, **env: str) -> Job:
    """Submit like sbatch: the header gives the allocation; the log is opened before the script runs."""
    opts = header(clone / script)
    name = str(opts.get("job-name", Path(script).name))
    log = clone / str(opts["output"]).replace("%x", name).replace("%j", JOB_ID)
    if not log.parent.is_dir():  # slurmd cannot open the output file: the job fails, with no log
        raise SbatchRefused(f"cannot open {log}: no such directory")
    shim_log = tmp / "shimlog"
    shim_log.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and not k.startswith("SLURM_")}
    job_env = dict(
        base, PATH=f"{shims}:{base['PATH']}", SHIM_LOG=str(shim_log), PYTHON=str(shims / "python"),
        TMPDIR=str(tmp), SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME=name, SLURM_SUBMIT_DIR=str(clone),
        SLURM_NNODES=str(opts.get("nodes", 1)), SLURM_JOB_NODELIST="localhost",
        SLURM_CPUS_PER_TASK=str(opts.get("cpus-per-task", 1)), SLURM_GPUS_ON_NODE=str(opts.get("gpus-per-node", 0)),
        TRAIN_DRIVER=str(shims / "driver.py"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        **{**STREAM, **env},  # streamed data unless a test says otherwise (RPJ_STREAM="" = unset, as in bash)
    )
    out = open(log, "a" if opts.get("open-mode") == "append" else "w")
    proc = subprocess.Popen(["bash", script, *args], cwd=clone, env=job_env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out.close()
    return Job(proc, log, shim_log)


def wait_for(predicate, job: Job, timeout: float = 120) -> None:
    t0 = time.time()
    while not predicate():
        if job.proc.poll() is not None:
            raise AssertionError("the job ended first:\n" + job.output()[-3000:])
        if time.time() - t0 > timeout:
            job.kill()
            raise AssertionError("timed out:\n" + job.output()[-3000:])
        time.sleep(0.02)


# --- the log directory ----------------------------------------------------------------------------


def test_a_fresh_clone_has_the_log_directory(clone, shims, tmp_path):
    scripts = sorted((clone / "slurm").glob("*.sbatch"))
    assert {p.stem for p in scripts} == {*RECIPES, "train"}
    for script in scripts:
        out = Path(str(header(script)["output"]))
        assert not out.is_absolute() and (clone / out.parent).is_dir(), f"{script.name}: {out.parent} is not in a clone"
    # ... and only the placeholder is tracked: the logs themselves are ignored
    ignored = subprocess.run(["git", "check-ignore", "-q", f"slurm-logs/anllm_ac_7b-{JOB_ID}.out"], cwd=REPO)
    assert ignored.returncode == 0
    # the stand-in refuses a job whose log directory is missing, as SLURM does
    bare = tmp_path / "bare"
    (bare / "slurm").mkdir(parents=True)
    shutil.copy2(clone / "slurm" / "train.sbatch", bare / "slurm")
    with pytest.raises(SbatchRefused):
        sbatch(bare, shims, tmp_path, "slurm/train.sbatch", "anllm_ac_7b")


# --- scripts and table agree ------------------------------------------------------------------------


def test_recipe_scripts_are_generated_from_the_table():
    assert recipe_mod.check(RECIPES) == []  # else: .venv/bin/python slurm/recipe.py --write
    for r in RECIPES.values():
        assert header(REPO / "slurm" / f"{r.name}.sbatch") == as_strings(r.sbatch_options())
    common = as_strings(next(iter(RECIPES.values())).common)
    generic = header(REPO / "slurm" / "train.sbatch")
    assert {k: generic.get(k) for k in common} == common
    assert generic["signal"] == "B:USR1@600" and generic["mem"] == "0"


def test_recipe_variables_come_from_the_environment():
    r = RECIPES["anllm_ac_7b"]
    assert "model.path=/models/llama" in r.overrides({"LLAMA2_7B": "/models/llama", **STREAM})
    assert "model.path=meta-llama/Llama-2-7b-hf" in r.overrides({"LLAMA2_7B": "", **STREAM})  # empty = unset, as in bash
    local = r.overrides({"RPJ_DIR": "/data/rpj"})
    assert "data.paths=[/data/rpj/*.jsonl]" in local and not any(o.startswith("trainer.max_steps") for o in local)
    assert "trainer.max_steps=99" in r.overrides({"MAX_STEPS": "99", **STREAM})
    with pytest.raises(recipe_mod.RecipeError, match="set RPJ_DIR=... or RPJ_STREAM=..."):
        r.overrides({})  # the local copy is the default path; streaming only when asked for
    assert recipe_mod.expand("x=${a.b}", {}) == "x=${a.b}"  # Hydra's own interpolations are left alone
    with pytest.raises(recipe_mod.RecipeError, match="needs NOPE"):
        recipe_mod.expand("x=${NOPE}", {})
    with pytest.raises(recipe_mod.RecipeError, match="choose one of"):
        recipe_mod.get("nope", RECIPES)


def test_recipes_compose_and_the_fast_one_is_fast():
    from omegaconf import OmegaConf

    from anllm.schema import compose
    from anllm.train import validate

    cfgs = {}
    for name, r in RECIPES.items():
        cfgs[name] = cfg = compose("train", r.overrides(STREAM))
        validate(cfg, check_files=False)
        t = cfg.trainer
        if cfg.exp_name.startswith(("anllm", "baseline")):  # the exp's batch: 512 rows per step on 4 x 8 GPUs
            assert t.per_device_train_batch_size * t.gradient_accumulation_steps * r.gpus == 512
    fast, paper = cfgs["anllm_ac_7b_fast"], cfgs["anllm_ac_7b"]
    assert fast.protocol.name == "anllm" and fast.data.packing is True and fast.block_size == 8192
    assert fast.deepspeed.zero_optimization.stage == 2 and "offload_param" not in fast.deepspeed.zero_optimization
    assert "offload_optimizer" not in fast.deepspeed.zero_optimization
    assert paper.protocol.name == "paper" and paper.data.packing is False
    assert paper.deepspeed.zero_optimization.offload_param.device == "cpu"
    same = ("exp_name", "block_size", "model.name", "model.context_length", "trainer.learning_rate",
            "trainer.per_device_train_batch_size", "trainer.gradient_accumulation_steps", "trainer.seed")
    for key in same:  # the same method, model and schedule; only the protocol, packing and ZeRO stage differ
        assert OmegaConf.select(fast, key) == OmegaConf.select(paper, key), key


def test_recipe_pages_show_the_overrides_of_the_table():
    """experiments/recipes/*.md print each recipe's overrides: they must be the table's (streamed data, no env)."""
    shown = {}
    for page in sorted((REPO / "experiments" / "recipes").glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"Overrides of `(\w+)`", line)
            if not m:
                continue
            block = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("    "):
                    block += nxt.split()
                elif block:
                    break
            shown[m.group(1)] = (page.name, block)
    assert set(RECIPES) - set(shown) == {"sft_translation_ep_7b", "sft_translation_baseline_7b"}  # shown as "the other two"
    for name, (page, block) in shown.items():
        assert block == RECIPES[name].overrides(STREAM), f"{page}: the overrides of {name} differ from slurm/recipes.yaml"


# --- every recipe through the scripts ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_reaches_torchrun_with_its_overrides(clone, shims, tmp_path, name):
    r = RECIPES[name]
    job = sbatch(clone, shims, tmp_path, f"slurm/{name}.sbatch", **STREAM)  # no EXTRA: empty arrays under set -u
    assert job.wait() == 0, job.output()
    (srun,) = job.records("srun")
    assert f"--cpus-per-task={r.common['cpus-per-task']}" in srun["options"]
    assert "--ntasks-per-node=1" in srun["options"]
    assert srun["command"][:2] == ["bash", "slurm/torchrun.sh"]
    (run,) = job.records("torchrun")
    argv = run["argv"]
    assert f"--nnodes={r.nodes}" in argv and f"--nproc_per_node={r.gpus_per_node}" in argv
    assert f"--rdzv_id={JOB_ID}" in argv and "--rdzv_endpoint=localhost:29742" in argv
    assert argv[argv.index("train.py") + 1:] == r.overrides(STREAM)
    assert run["usr1_ignored"]  # torchrun itself must not die of (or act on) the time-limit signal
    env = run["env"]
    assert env["OMP_NUM_THREADS"] == str(int(r.common["cpus-per-task"]) // r.gpus_per_node)
    assert env["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/torch_extensions_{JOB_ID}_0"  # node-local, per job start
    assert not Path(env["TORCH_EXTENSIONS_DIR"]).exists()  # removed at the end
    assert job.scontrol() == []  # no time-limit signal: no requeue


def test_overrides_from_extra_and_arguments_come_last(clone, shims, tmp_path):
    job = sbatch(clone, shims, tmp_path, "slurm/anllm_ac_7b.sbatch", "trainer.save_steps=7",
                 EXTRA="trainer.logging_steps=3 trainer.save_steps=5", RPJ_DIR="/data/rpj", LLAMA2_7B="/m/7b")
    assert job.wait() == 0, job.output()
    argv = job.records("torchrun")[0]["argv"]
    tail = argv[argv.index("train.py") + 1:]
    expected = RECIPES["anllm_ac_7b"].overrides({"RPJ_DIR": "/data/rpj", "LLAMA2_7B": "/m/7b"})
    assert tail == [*expected, "trainer.logging_steps=3", "trainer.save_steps=5", "trainer.save_steps=7"]


def test_the_generic_script_takes_overrides_or_a_recipe(clone, shims, tmp_path):
    job = sbatch(clone, shims, tmp_path / "a", "slurm/train.sbatch", "+exp=anllm_ac", "model=tiny")
    assert job.wait() == 0, job.output()
    argv = job.records("torchrun")[0]["argv"]
    assert argv[argv.index("train.py") + 1:] == ["+exp=anllm_ac", "model=tiny"] and "--nnodes=1" in argv
    job = sbatch(clone, shims, tmp_path / "b", "slurm/train.sbatch", RECIPE="sft_translation_ep_7b")
    assert job.wait() == 0, job.output()
    job = sbatch(clone, shims, tmp_path / "d", "slurm/anllm_ac_7b.sbatch", RPJ_STREAM="")  # neither copy nor stream
    assert job.wait() == 2 and "RPJ_DIR=..." in job.output() and job.records("torchrun") == []
    job = sbatch(clone, shims, tmp_path / "b2", "slurm/train.sbatch", RECIPE="sft_translation_ep_7b")
    assert job.wait() == 0, job.output()
    argv = job.records("torchrun")[0]["argv"]
    assert argv[argv.index("train.py") + 1:] == RECIPES["sft_translation_ep_7b"].overrides(STREAM)
    job = sbatch(clone, shims, tmp_path / "c", "slurm/train.sbatch", "no_such_recipe")
    assert job.wait() == 2 and "choose one of" in job.output() and job.records("torchrun") == []


def test_array_expansions_are_safe_under_set_u_on_old_bash():
    """bash < 4.4 calls an empty array unbound under `set -u`: every "${A[@]}" must be ${A[@]+"${A[@]}"}."""
    safe = re.compile(r'\$\{(\w+)\[([@*])\]\+"\$\{\1\[\2\]\}"\}')
    unsafe = re.compile(r"\$\{\w+\[[@*]\]\}")
    assert unsafe.findall(safe.sub("", 'f "${A[@]}" ${B[@]+"${B[@]}"} "${#C[@]}"')) == ["${A[@]}"]  # the check checks
    for script in [*(REPO / "slurm").glob("*.sbatch"), *(REPO / "slurm").glob("*.sh")]:
        code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        left = unsafe.findall(safe.sub("", code))
        assert not left, f"{script.name}: {left}"


# --- the time limit --------------------------------------------------------------------------------


def test_time_limit_signal_reaches_the_training_and_requeues(clone, shims, tmp_path):
    job = sbatch(clone, shims, tmp_path, "slurm/anllm_ac_7b_fast.sbatch", FAKE_TORCHRUN="worker")
    ready = job.shim_log / "worker.ready"
    wait_for(ready.exists, job, timeout=60)
    os.kill(job.proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@600 does
    assert job.wait(timeout=60) == 0, job.output()
    assert (job.shim_log / "worker.log").read_text().startswith("got ")
    assert job.scontrol() == [f"requeue {JOB_ID}"]
    assert "requeueing job" in job.output()


def test_a_training_that_does_not_stop_is_requeued_anyway(clone, shims, tmp_path):
    job = sbatch(clone, shims, tmp_path, "slurm/anllm_ac_7b_fast.sbatch", FAKE_TORCHRUN="stubborn",
                 REQUEUE_GRACE="1", FAKE_REQUEUE_KILLS="1")
    wait_for((job.shim_log / "worker.ready").exists, job, timeout=60)
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.wait(timeout=60) == -signal.SIGKILL  # ended by the requeue, not by itself
    assert job.scontrol() == [f"requeue {JOB_ID}"]
    assert "did not stop within 1s" in job.output()


@pytest.mark.slow  # real training processes
def test_recipe_trains_stops_on_the_time_limit_and_resumes(clone, shims, tmp_path):
    """The fast recipe through the scripts with train.py on a tiny model (the overrides via EXTRA)."""
    from anllm.train.checkpoints import checkpoint_dirs, is_complete

    extra = ("model=tiny data=demo deepspeed=none block_size=64 trainer.max_steps=2000 preprocessing.num_proc=1 "
             "trainer.dataloader_num_workers=0 trainer.report_to=none trainer.disable_tqdm=true "
             f"cache_dir={tmp_path / 'cache'}")
    env = dict(FAKE_TORCHRUN="train", EXTRA=extra, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = sbatch(clone, shims, tmp_path / "1", "slurm/anllm_ac_7b_fast.sbatch", **env)
    wait_for(lambda: "'loss'" in job.output(), job, timeout=180)  # it trains
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, job.output()[-3000:]
    assert job.scontrol() == [f"requeue {JOB_ID}"]
    out = clone / "outputs" / "fast" / "anllm_ac_7b"
    (step, ckpt), *more = reversed(checkpoint_dirs(out))
    assert is_complete(ckpt) and 0 < step < 2000, job.output()[-3000:]
    assert f"Stopped for a signal at step {step}" in job.output()  # it stopped at the step it saved ...
    assert not (out / "anllm_train_summary.json").exists()  # ... and the run does not look finished

    # The requeued job: the same command, resumed from that checkpoint (two more steps, then done).
    job = sbatch(clone, shims, tmp_path / "2", "slurm/anllm_ac_7b_fast.sbatch", f"trainer.max_steps={step + 2}", **env)
    assert job.wait(timeout=180) == 0, job.output()[-3000:]
    summary = json.loads((out / "anllm_train_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["global_step"] == step + 2
    assert job.scontrol() == []


# --- the training side, in process ---------------------------------------------------------------------


def test_preemption_callback_saves_a_complete_checkpoint_and_the_relaunch_resumes(tmp_path):
    from hydra import compose, initialize_config_dir
    from transformers import TrainerCallback

    from anllm.train import run
    from anllm.train.checkpoints import checkpoint_dirs, is_complete
    from anllm.schema import CONF_DIR
    from anllm.train.preemption import PreemptionCallback

    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+exp=anllm_ac", "model=tiny", "data=demo", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
            "trainer.report_to=none", "trainer.disable_tqdm=true", "block_size=64", "trainer.max_steps=6",
            "trainer.save_steps=100", "heldout.enabled=false"])

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, delivered to this process

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    import anllm.train.runner as runner

    before = signal.getsignal(signal.SIGUSR1)
    cb = None if hasattr(runner, "PreemptionCallback") else PreemptionCallback()  # runner.run registers one
    with pytest.raises(SystemExit) as stop:  # the process ends after the checkpoint (torchrun sees exit code 0)
        run(cfg, callbacks=[SignalAt(), *([cb] if cb else [])])
    assert stop.value.code == 0
    (stopped, ckpt), = checkpoint_dirs(out)
    assert is_complete(ckpt) and stopped in (2, 3)  # saved where it stopped: the step of the signal or the next
    if cb is not None:
        assert cb.received == signal.SIGUSR1 and cb.stopped_at == stopped == 2
    assert not (out / "anllm_train_summary.json").exists()  # not a finished run
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored after training

    resumed = run(cfg, callbacks=[CountSteps()])
    assert resumed.resumed_from.endswith(f"checkpoint-{stopped}") and resumed.global_step == 6
    assert CountSteps.steps == 6 - stopped  # it continued from there


def _rank_main(rank: int, port: int, out: str, queue) -> None:
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from anllm.train.preemption import PreemptionCallback

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cb = PreemptionCallback(exit_code=None)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
    state, args = TrainerState(), TrainingArguments(output_dir=out, report_to=[], use_cpu=True)
    decisions = []
    for step in (1, 2):
        state.global_step = step
        control = cb.on_step_end(args, state, TrainerControl())
        decisions.append((control.should_save, control.should_training_stop))
    cb.restore()
    dist.destroy_process_group()
    queue.put((rank, decisions))


@pytest.mark.slow  # real training processes
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(tmp_path), queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = dict(queue.get(timeout=10) for _ in procs)
    assert results[0] == results[1] == [(True, True), (True, True)]  # rank 0 got no signal, and stops too


def test_preemption_callback_gives_a_second_sigterm_its_old_meaning():
    code = ("import os, signal, time\nfrom anllm.train.preemption import PreemptionCallback\n"
            "cb = PreemptionCallback()\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.1)\n"
            "assert cb.received == signal.SIGTERM\nprint('first: flag', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM and "first: flag" in proc.stdout and "not reached" not in proc.stdout


# --- launcher=slurm (submitit) -----------------------------------------------------------------------


def test_submitit_launcher_asks_for_what_a_gpu_node_has():
    import yaml

    launcher = yaml.safe_load((REPO / "conf" / "launcher" / "slurm.yaml").read_text())["hydra"]["launcher"]
    assert launcher["tasks_per_node"] * launcher["cpus_per_task"] <= 64  # 8-GPU nodes with 64 cores exist
    assert launcher["additional_parameters"]["mem"] == 0  # all of the node's memory, not the site default
