"""Config composition and validation for train.py (no training; about 15 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from anllm.train import ConfigError, available_options, validate
from anllm.schema import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

EXPS = ["anllm_ac", "anllm_ep", "baseline", "sft_translation_ac", "sft_translation_ep", "sft_translation_baseline"]
MODELS = ["llama2_7b", "llama2_13b", "smollm2_135m", "tiny"]
DATA = ["redpajama_sample", "jsonl", "demo", "alpaca_newstest"]
DEEPSPEED = ["zero2", "zero3", "zero3_offload", "none"]


def compose_cfg(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_config_groups_are_the_documented_interface():
    assert set(EXPS) <= set(available_options("exp"))
    assert set(MODELS) <= set(available_options("model"))
    assert set(DATA) <= set(available_options("data"))
    assert set(DEEPSPEED) <= set(available_options("deepspeed"))
    assert {"local", "slurm"} <= set(available_options("launcher"))


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes_and_validates_with_every_model_and_data(exp):
    for model in MODELS:
        for data in DATA:
            cfg = compose_cfg(f"+exp={exp}", f"model={model}", f"data={data}", "trainer.max_steps=10")
            validate(cfg, check_files=False)
            assert cfg.exp_name == exp and cfg.data.id == data and cfg.model.name == model


def test_exp_sets_the_method_and_the_paper_schedule():
    ac = compose_cfg("+exp=anllm_ac", "scale=paper")
    ep = compose_cfg("+exp=anllm_ep", "scale=paper")
    base = compose_cfg("+exp=baseline", "scale=paper")
    assert (ac.anchor.mode, ep.anchor.mode, base.anchor.mode) == ("ac", "ep", "none")
    assert (ac.block_size, ep.block_size, base.block_size) == (8192, 4096, 8192)
    t = ac.trainer
    assert t.learning_rate == 2e-5 and t.lr_scheduler_type == "constant_with_warmup" and t.warmup_steps == 20
    assert t.weight_decay == 0.0 and t.per_device_train_batch_size == 1 and t.gradient_accumulation_steps == 16
    assert t.seed == 34 and t.gradient_checkpointing is True and t.bf16 == "auto" and t.max_steps == -1
    # model and data stay orthogonal: the exp does not pick them
    assert ac.model.name == "smollm2_135m" and ac.data.id == "demo"
    sft = compose_cfg("+exp=sft_translation_ac", "scale=paper")
    assert sft.data.id == "alpaca_newstest" and sft.block_size == 1024 and sft.anchor.mode == "ac"
    assert compose_cfg("+exp=sft_translation_ac", "data=jsonl").data.id == "jsonl"  # command line wins


def test_default_scale_is_a_short_cpu_run_and_command_line_wins():
    cfg = compose_cfg("+exp=anllm_ac")
    assert cfg.scale_name == "demo" and cfg.block_size <= 512 and 0 < cfg.trainer.max_steps <= 100
    assert cfg.trainer.seed == 34 and cfg.anchor.mode == "ac"  # the method's settings stay
    # demo teaches the anchors in minutes (lr 2e-4, cosine) and checks held-out PPL; paper keeps 2e-5
    assert cfg.trainer.learning_rate == 2e-4 and cfg.heldout.enabled == "auto" and cfg.data.holdout_fraction > 0
    assert compose_cfg("+exp=anllm_ac", "scale=paper").trainer.learning_rate == 2e-5
    cfg = compose_cfg("+exp=anllm_ac", "model=tiny", "data=demo", "trainer.max_steps=7", "output_dir=/tmp/x")
    assert cfg.trainer.max_steps == 7 and cfg.output_dir == "/tmp/x" and cfg.model.source == "tiny"
    validate(cfg)


def test_deepspeed_groups_are_hf_auto_configs():
    for name, stage in [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)]:
        cfg = compose_cfg("+exp=anllm_ac", f"deepspeed={name}")
        assert cfg.deepspeed.zero_optimization.stage == stage
        assert cfg.deepspeed.train_micro_batch_size_per_gpu == "auto"
    off = compose_cfg("+exp=anllm_ac", "deepspeed=zero3_offload").deepspeed.zero_optimization
    assert off.offload_optimizer.device == "cpu" and off.offload_param.device == "cpu"
    assert not compose_cfg("+exp=anllm_ac", "deepspeed=none").deepspeed


def test_slurm_launcher_uses_submitit():
    cfg = compose_cfg("+exp=anllm_ac", "launcher=slurm", hydra_cfg=True)
    assert "submitit" in cfg.hydra.launcher._target_ and "Slurm" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.max_num_timeout > 0  # preempted/timed-out jobs are requeued (resume=auto)


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_exp_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("+exp=anllm_xx")
    assert "anllm_ac" in str(e.value) and "sft_translation_ep" in str(e.value)


def test_missing_exp_says_how_to_choose_one():
    with pytest.raises(ConfigError, match=r"\+exp=.*anllm_ac.*anllm_ep"):
        validate(compose_cfg())


def test_unknown_keys_are_named():
    with pytest.raises(ConfigCompositionException, match="lerning_rate"):
        compose_cfg("+exp=anllm_ac", "trainer.lerning_rate=1")  # Hydra: not in the config
    with pytest.raises(ConfigError, match=r"trainer\.lerning_rate.*learning_rate"):
        validate(compose_cfg("+exp=anllm_ac", "+trainer.lerning_rate=1"))
    with pytest.raises(ConfigError, match="blok_size"):
        validate(compose_cfg("+exp=anllm_ac", "+blok_size=3"))
    with pytest.raises(ConfigError, match=r"model\.contxt"):
        validate(compose_cfg("+exp=anllm_ac", "+model.contxt=3"))


def test_block_size_larger_than_the_model_context():
    cfg = compose_cfg("+exp=anllm_ac", "scale=paper", "model=llama2_7b", "data=redpajama_sample", "trainer.max_steps=10")
    with pytest.raises(ConfigError, match=r"block_size=8192 .* model\.context_length=4096"):
        validate(cfg, check_files=False)
    # The authors' setting, asked for explicitly, is accepted.
    cfg = compose_cfg("+exp=anllm_ac", "scale=paper", "model=llama2_7b", "model.context_length=8192",
                      "data=redpajama_sample", "trainer.max_steps=10")
    validate(cfg, check_files=False)
    with pytest.raises(ConfigError, match="block_size=9000"):
        validate(compose_cfg("+exp=anllm_ep", "model=tiny", "block_size=9000"))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["anchor.mode=xyz"], r"anchor\.mode='xyz'"),
        (["model.attn_implementation=flash_attention_2"], r"model\.attn_implementation"),
        (["data=redpajama_sample", "scale=paper"], r"trainer\.max_steps"),  # streaming needs a step count
        (["trainer.resume=/no/such/dir"], r"trainer\.resume"),
        (["trainer.save_total_limit=0"], r"trainer\.save_total_limit"),
        (["trainer.gradient_accumulation_steps=0"], r"trainer\.gradient_accumulation_steps"),
        (["+trainer.output_dir=/tmp/x"], r"output_dir=\.\.\."),
        (["data=jsonl", "data.paths=[/no/such/*.jsonl]"], r"No file matches"),
        (["model=llama2_7b", "model.path=null"], r"model\.path"),
    ],
)
def test_bad_values_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(compose_cfg("+exp=anllm_ac", *overrides))


def test_local_data_files_are_checked(shared_data: Path):
    validate(compose_cfg("+exp=anllm_ac", "data=jsonl", f"data.paths=[{shared_data}/pretrain_text/*.jsonl]"))
    validate(compose_cfg("+exp=sft_translation_ac", f"data.alpaca_path={shared_data}/alpaca/alpaca_5000.json",
                         f"data.parallel_path={shared_data}/newstest_de_en/newstest2017-2020.de-en.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(compose_cfg("+exp=sft_translation_ac", f"data.alpaca_path={shared_data}/alpaca/nope.json"))


# --- the SLURM scripts of the paper runs -----------------------------------------------------------

SLURM_DIR = REPO / "slurm"
PAPER_RUNS = ["anllm_ac_7b", "anllm_ep_7b", "anllm_ac_13b", "baseline_7b",
              "sft_translation_ac_7b", "sft_translation_ep_7b", "sft_translation_baseline_7b"]


def _train_overrides_of(script: Path, tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Run an sbatch script with stand-ins for srun/scontrol/python; return train.py's overrides."""
    import json
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\necho node-b\n")
    capture = tmp_path / "argv.json"
    (bin_dir / "fakepython").write_text(
        f"#!{__import__('sys').executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(capture)!r}, 'w'))\n"
    )
    for name in ("srun", "scontrol", "fakepython"):
        (bin_dir / name).chmod(0o755)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
                    SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="4", SLURM_SUBMIT_DIR=str(REPO),
                    **env)
    proc = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(capture.read_text())
    assert argv[:2] == ["-m", "torch.distributed.run"] and "--rdzv_endpoint=node-a:29742" in argv
    assert "--nnodes=4" in argv and "--rdzv_id=4242" in argv
    return argv[argv.index("train.py") + 1:]


@pytest.mark.parametrize("run_name", PAPER_RUNS)
def test_paper_sbatch_scripts_compose_and_validate(run_name, tmp_path):
    overrides = _train_overrides_of(SLURM_DIR / f"{run_name}.sbatch", tmp_path, {"RPJ_STREAM": "1"})
    cfg = compose_cfg(*overrides)
    validate(cfg, check_files=False)
    assert cfg.scale_name == "paper" and cfg.protocol.name == "paper"  # the authors' protocol, item by item
    assert cfg.output_dir == f"outputs/paper/{run_name}"
    if run_name.startswith(("anllm", "baseline")):
        assert cfg.deepspeed.zero_optimization.offload_param.device == "cpu"
        # one epoch of ~850k documents, one per row, 512 rows per step
        assert cfg.data.id == "redpajama_sample" and cfg.trainer.max_steps == 1661 and cfg.data.packing is False
        assert cfg.trainer.gradient_accumulation_steps == 16 and cfg.trainer.per_device_train_batch_size == 1
    else:
        assert cfg.data.id == "alpaca_newstest" and cfg.model.path.startswith("outputs/paper/")
    # With a local copy of the corpus the same scripts read it as JSONL (exact epochs, cached).
    if run_name == "anllm_ac_7b":
        overrides = _train_overrides_of(SLURM_DIR / f"{run_name}.sbatch", tmp_path, {"RPJ_DIR": "/data/rpj"})
        cfg = compose_cfg(*overrides)
        validate(cfg, check_files=False)
        assert cfg.data.id == "jsonl" and list(cfg.data.paths) == ["/data/rpj/*.jsonl"] and cfg.trainer.max_steps == -1
        assert cfg.trainer.num_train_epochs == 1 and cfg.data.packing is False


def test_submitit_tasks_get_the_torch_distributed_environment(monkeypatch):
    """launcher=slurm runs one submitit task per GPU; each must know its rank and the rendezvous."""
    import os

    from anllm.train.distributed import env_from_submitit

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so that monkeypatch restores the key's absence afterwards: env_from_submitit
        # exports these, and a leaked RANK/WORLD_SIZE makes every later Trainer wait for a process group.
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    assert env_from_submitit() is False  # not inside a submitit job: nothing to do
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="1234", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4",
                 SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[01-02]")
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert env_from_submitit() is True
    got = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu01"}
    assert env_from_submitit() is False  # torchrun-style variables already set: left alone
