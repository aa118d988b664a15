"""Multi-GPU launch: the engine of each accelerate config, the refused combinations (each with its fix), the
saved-adapter check, and two CPU processes (gloo, DDP) that train the same SFT and DPO adapters as one
process."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from align import config, dpo, launch, modeling, rm, sft
from align.manifest import read_json

from .conftest import REPO, run_launcher
from .test_dpo import dpo_argv
from .test_rm import rm_argv
from .test_sft import sft_argv

ACCELERATE_DIR = os.path.join(REPO, "recipes", "accelerate")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    """Start each test outside any launcher: no accelerate / FSDP / torchrun variables."""
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")) or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)


def accelerate_env(name: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file recipes/accelerate/<name>` gives each process, from
    accelerate's own launcher code (torchrun adds WORLD_SIZE when it starts several processes)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", os.path.join(ACCELERATE_DIR, name), "train.py"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = {}
    env = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    if args.num_processes > 1:
        env["WORLD_SIZE"] = str(args.num_processes)
    return env


def model_args(recipe: str | None = None, **overrides):
    """ModelArguments from a shipped recipe's model keys (or a bf16 LoRA default), with overrides."""
    keys = {f.name for f in fields(config.ModelArguments)}
    values = {"model_name_or_path": "base", "use_peft": True, "dtype": "bfloat16"}
    if recipe:
        values.update({k: v for k, v in config.load_yaml(os.path.join(REPO, recipe)).items() if k in keys})
    # device_map is not a ModelArguments key today; check_launch reads it when a stage adds one
    device_map = overrides.pop("device_map", None)
    values.update(overrides)
    args = config.ModelArguments(**values)
    if device_map is not None:
        args.device_map = device_map
    return args


def train_args(recipe: str | None = None, **overrides):
    """The trainer-config attributes check_launch reads, from a recipe's keys or defaults, with overrides."""
    values = {
        "deepspeed": None,
        "deepspeed_plugin": None,
        "fsdp": None,
        "fsdp_plugin_args": None,
        "world_size": 1,
        "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
        "ddp_find_unused_parameters": None,
        "model_init_kwargs": None,
    }
    if recipe:
        data = config.load_yaml(os.path.join(REPO, recipe))
        values["activation_checkpointing"] = data.get("gradient_checkpointing", False)
        values["activation_checkpointing_kwargs"] = data.get("gradient_checkpointing_kwargs")
    values.update(overrides)
    return SimpleNamespace(**values)


# ------------------------------------------------------------------------------------------------------------
# Which engine


@pytest.mark.parametrize(
    "name, engine, processes",
    [
        ("single_gpu.yaml", "none", 1),
        ("multi_gpu.yaml", "ddp", 8),
        ("cpu_2proc.yaml", "ddp", 2),
        ("deepspeed_zero2.yaml", "deepspeed_zero2", 8),
        ("deepspeed_zero3.yaml", "deepspeed_zero3", 8),
        ("deepspeed_zero3_qlora.yaml", "deepspeed_zero3", 8),
        ("fsdp.yaml", "fsdp", 8),
        ("fsdp_qlora.yaml", "fsdp", 2),
    ],
)
def test_engine_of_each_accelerate_config(name, engine, processes, monkeypatch):
    env = accelerate_env(name)
    if name == "single_gpu.yaml":  # one GPU on a host of several (one process seeing two: TRL refuses DataParallel)
        import accelerate.utils.launch as accelerate_launch
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        # accelerate >= 1.16 sets the visible-devices variable of the host's backend: be a CUDA host
        monkeypatch.setattr(accelerate_launch, "get_torch_accelerator_backend",
                            lambda check_available=True: ("cuda", None), raising=False)
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
            ["--config_file", os.path.join(ACCELERATE_DIR, name), "train.py"]))
        assert args.gpu_ids == "0"
        assert accelerate_launch.prepare_simple_launcher_cmd_env(args)[1]["CUDA_VISIBLE_DEVICES"] == "0"
    assert launch.distributed_engine(env=env) == engine
    assert int(env.get("WORLD_SIZE", 1)) == processes
    if engine == "deepspeed_zero3":
        assert launch.deepspeed_settings(env=env) == {"stage": 3, "gather_16bit_on_save": True}
    if name in ("fsdp.yaml", "fsdp_qlora.yaml"):
        fsdp = launch.fsdp_settings(env=env)
        assert fsdp["version"] == 2 and fsdp["state_dict_type"] == "SHARDED_STATE_DICT"


def test_engine_from_the_trainer_config_and_the_process_environment(tmp_path, monkeypatch):
    assert launch.distributed_engine(train_args()) == "none"
    assert (
        launch.distributed_engine(train_args(deepspeed={"zero_optimization": {"stage": 3}}))
        == "deepspeed_zero3"
    )
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert launch.distributed_engine(train_args(deepspeed=str(ds_json))) == "deepspeed_zero2"
    assert launch.distributed_engine(train_args(fsdp=True, fsdp_plugin_args={"fsdp_version": 2})) == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.distributed_engine() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    assert launch.distributed_engine() == "deepspeed_zero2"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # the JSON file wins over the launcher's stage
    assert launch.distributed_engine() == "deepspeed_zero2"


# ------------------------------------------------------------------------------------------------------------
# What passes


LORA, QLORA, DPO = (
    "recipes/smollm2/sft_lora.yaml",
    "recipes/smollm2/sft_qlora.yaml",
    "recipes/smollm2/dpo_lora.yaml",
)


@pytest.mark.parametrize(
    "name, recipe, overrides",
    [(name, LORA, {}) for name in sorted(os.listdir(ACCELERATE_DIR))]
    + [
        ("multi_gpu.yaml", QLORA, {}),
        ("deepspeed_zero2.yaml", QLORA, {}),
        ("multi_gpu.yaml", LORA, {"load_in_8bit": True}),
        ("deepspeed_zero3_qlora.yaml", QLORA, {"bnb_4bit_quant_storage": "bfloat16"}),
        ("fsdp_qlora.yaml", QLORA, {"bnb_4bit_quant_storage": "bfloat16"}),
        # FSDP2 shards float-stored 4-bit weights
        ("fsdp.yaml", QLORA, {"bnb_4bit_quant_storage": "bfloat16"}),
        # fp32 storage (fp32 master weights): any compute dtype
        (
            "deepspeed_zero3_qlora.yaml",
            QLORA,
            {"bnb_4bit_quant_storage": "float32", "dtype": "float32", "bnb_4bit_compute_dtype": "bfloat16"},
        ),
        ("deepspeed_zero3.yaml", DPO, {}),
    ],
)
def test_shipped_recipes_pass_under_the_shipped_configs(name, recipe, overrides):
    launch.check_launch(model_args(recipe, **overrides), train_args(recipe), env=accelerate_env(name))


def test_gradient_checkpointing_that_works(monkeypatch):
    fsdp, zero3 = accelerate_env("fsdp.yaml"), accelerate_env("deepspeed_zero3.yaml")
    # without kwargs (or with empty ones) transformers passes use_reentrant False
    for kwargs in (None, {}, {"use_reentrant": False}):
        launch.check_launch(
            model_args(),
            train_args(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs),
            env=fsdp,
        )
    for kwargs in (None, {"use_reentrant": True}):  # TRL sets use_reentrant True itself when it is unset
        launch.check_launch(
            model_args(),
            train_args(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs),
            env=zero3,
        )
    # a full fine-tune (no adapter) under FSDP may checkpoint reentrantly
    launch.check_launch(
        model_args(use_peft=False),
        train_args(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
        env=fsdp,
    )


# ------------------------------------------------------------------------------------------------------------
# What is refused, with the reason and the fix


def zero3_without_save():
    env = accelerate_env("deepspeed_zero3.yaml")
    env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "false"
    return env


def fsdp1_with_orig_params():
    env = accelerate_env("fsdp_qlora.yaml")
    env.update(FSDP_VERSION="1", FSDP_USE_ORIG_PARAMS="true", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
    return env


def fsdp_with_own_checkpointing():
    env = accelerate_env("fsdp.yaml")
    env["FSDP_ACTIVATION_CHECKPOINTING"] = "true"
    return env


GC = {"activation_checkpointing": True}
REFUSED = [
    # (id, accelerate config or env, model overrides, trainer overrides, what the fix must say)
    ("8bit-zero3", "deepspeed_zero3.yaml", {"load_in_8bit": True}, {}, "use load_in_4bit"),
    ("8bit-fsdp", "fsdp.yaml", {"load_in_8bit": True}, {}, "keep 8-bit under DDP or ZeRO-2"),
    (
        "4bit-uint8-zero3",
        "deepspeed_zero3_qlora.yaml",
        {"load_in_4bit": True},
        {},
        "bnb_4bit_quant_storage: bfloat16 and dtype: bfloat16",
    ),
    (
        "4bit-uint8-fsdp",
        "fsdp_qlora.yaml",
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"},
        {},
        "bnb_4bit_quant_storage: bfloat16",
    ),
    (
        "4bit-storage-not-dtype",
        "fsdp_qlora.yaml",
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16", "dtype": "float32"},
        {},
        "set dtype: bfloat16",
    ),
    (
        "4bit-storage-dtype-auto",
        "deepspeed_zero3_qlora.yaml",
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16", "dtype": "auto"},
        {},
        "set dtype: bfloat16",
    ),
    (
        "4bit-compute-not-storage",
        "deepspeed_zero3_qlora.yaml",
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16", "bnb_4bit_compute_dtype": "float16"},
        {},
        "set bnb_4bit_compute_dtype: bfloat16",
    ),
    (
        "4bit-fsdp1-orig-params",
        fsdp1_with_orig_params,
        {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"},
        {},
        "fsdp_use_orig_params: false and fsdp_cpu_ram_efficient_loading: true",
    ),
    (
        "device-map-zero2",
        "deepspeed_zero2.yaml",
        {},
        {"model_init_kwargs": {"device_map": "auto"}},
        "remove device_map",
    ),
    ("device-map-fsdp", "fsdp.yaml", {"device_map": {"": 0}}, {}, "remove device_map"),
    (
        "device-map-ddp-spread",
        "multi_gpu.yaml",
        {},
        {"model_init_kwargs": {"device_map": "auto"}},
        "remove device_map",
    ),
    (
        "reentrant-fsdp-peft",
        "fsdp.yaml",
        {},
        dict(GC, activation_checkpointing_kwargs={"use_reentrant": True}),
        "gradient_checkpointing_kwargs: {use_reentrant: false}",
    ),
    (
        "torch-default-reentrant-fsdp",
        "fsdp.yaml",
        {},
        dict(GC, activation_checkpointing_kwargs={"offload": False, "preserve_rng_state": True}),
        "use_reentrant: false",
    ),
    (
        "two-checkpointings-fsdp",
        fsdp_with_own_checkpointing,
        {},
        GC,
        "fsdp_activation_checkpointing: true with gradient_checkpointing: false",
    ),
    (
        "non-reentrant-zero3-peft",
        "deepspeed_zero3.yaml",
        {},
        dict(GC, activation_checkpointing_kwargs={"use_reentrant": False}),
        "gradient_checkpointing_kwargs: {use_reentrant: true}",
    ),
    (
        "reentrant-ddp-unused",
        "multi_gpu.yaml",
        {},
        dict(GC, activation_checkpointing_kwargs={"use_reentrant": True}, ddp_find_unused_parameters=True),
        "ddp_find_unused_parameters: false",
    ),
    ("full-zero3-no-16bit-save", zero3_without_save, {"use_peft": False}, {}, "zero3_save_16bit_model: true"),
]


@pytest.mark.parametrize(
    "launcher, model_kw, train_kw, fix", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_known_breaking_launches_are_refused_with_the_fix(launcher, model_kw, train_kw, fix):
    env = launcher() if callable(launcher) else accelerate_env(launcher)
    with pytest.raises(launch.LaunchConfigError) as err:
        launch.check_launch(model_args(**model_kw), train_args(**train_kw), env=env)
    message = str(err.value)
    assert "because" in message and "fix:" in message, message
    assert fix in message, message
    assert isinstance(err.value, ValueError)


def test_every_problem_is_reported_at_once():
    env = zero3_without_save()
    with pytest.raises(launch.LaunchConfigError) as err:
        launch.check_launch(
            model_args(load_in_8bit=True, use_peft=False),
            train_args(model_init_kwargs={"device_map": "auto"}),
            env=env,
        )
    lines = [line for line in str(err.value).splitlines() if line.startswith("- ")]
    assert len(lines) == 3 and all("because" in line and "fix:" in line for line in lines)
    assert str(err.value).startswith("this launch (deepspeed_zero3) is known to break")


def test_deepspeed_json_without_gathering_on_save(tmp_path):
    """A full fine-tune under ZeRO-3 must gather its weights on save; an adapter is gathered either way (the
    Trainer consolidates a PEFT model's trainable weights itself: a 1-GPU ZeRO-3 run without it saved
    all 28 LoRA tensors)."""
    path = tmp_path / "ds_z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    full = model_args(use_peft=False)
    with pytest.raises(launch.LaunchConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        launch.check_launch(full, train_args(deepspeed=str(path)))
    launch.check_launch(model_args(), train_args(deepspeed=str(path)))
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}})
    )
    launch.check_launch(full, train_args(deepspeed=str(path)))


def test_the_quantized_loader_must_not_pin_a_device_under_zero3(monkeypatch):
    """On a GPU, align's loader gives a quantized base device_map {"": local rank}; transformers refuses any
    device map under ZeRO-3, so check_launch refuses until modeling.kbit_device_map returns None there."""
    env = accelerate_env("deepspeed_zero3_qlora.yaml")
    args = model_args(QLORA, bnb_4bit_quant_storage="bfloat16")
    monkeypatch.setattr(modeling, "kbit_device_map", lambda: {"": 0})
    with pytest.raises(launch.LaunchConfigError, match="kbit_device_map must return None under ZeRO-3"):
        launch.check_launch(args, train_args(QLORA), env=env)
    monkeypatch.setattr(modeling, "kbit_device_map", lambda: None)
    launch.check_launch(args, train_args(QLORA), env=env)


def test_a_real_trainer_config(tmp_path, monkeypatch):
    """The attributes check_launch reads, on transformers' own TrainingArguments (old key names resolved)."""
    args = config.SFTArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    for key, value in accelerate_env("fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(launch.LaunchConfigError, match="use_reentrant: false"):
        launch.check_launch(model_args(), args)
    args.activation_checkpointing_kwargs = {"use_reentrant": False}
    launch.check_launch(model_args(), args)


# ------------------------------------------------------------------------------------------------------------
# Trainer set-up and the saved adapter


@pytest.fixture()
def small_adapter(tiny_llama, tmp_path):
    """A saved LoRA adapter on the tiny Llama whose B matrices moved, as in training; returns (dir, model)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, modeling.lora_config(model_args(lora_r=4), base))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    return out, model


def test_check_saved_adapter_counts_a_good_adapter(small_adapter):
    out, model = small_adapter
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert launch.check_saved_adapter(out) == {
        "tensors": len(lora),
        "parameters": sum(p.numel() for p in lora.values()),
    }


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "no adapter_model.safetensors was saved"),
        ("no_tensors", "holds no tensors"),
        ("zero_size", "have no elements"),
        ("untrained", "LoRA B matrices are all zero"),
        ("nan", "NaN or infinite"),
    ],
)
def test_check_saved_adapter_catches_empty_and_untrained_adapters(small_adapter, damage, message):
    out, _ = small_adapter
    path = os.path.join(out, "adapter_model.safetensors")
    weights = load_file(path)
    if damage == "missing":
        os.remove(path)
    elif damage == "no_tensors":  # what a ZeRO-3 save without gathering writes
        save_file({}, path)
    elif damage == "zero_size":  # a rank's empty ZeRO-3 partitions saved as they are
        save_file({k: torch.empty(0) for k in weights}, path)
    elif damage == "untrained":
        save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, path)
    elif damage == "nan":
        save_file({k: v * float("nan") if "lora_A" in k else v for k, v in weights.items()}, path)
    with pytest.raises(launch.EmptyAdapterError, match=message):
        launch.check_saved_adapter(out)
    if damage == "untrained":  # a freshly initialised adapter is fine when nothing was trained
        assert launch.check_saved_adapter(out, trained=False)["tensors"] == len(weights)


def test_prepare_trainer_gives_adapters_the_base_dtype_under_zero3(tiny_llama, monkeypatch):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model = get_peft_model(base, modeling.lora_config(model_args(lora_r=4), base))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in lora} == {torch.float32}  # PEFT's default on a bf16 base
    trainer = SimpleNamespace(args=train_args(), model=model)
    assert launch.prepare_trainer(trainer) == 0  # one process: nothing to do
    for key, value in accelerate_env("deepspeed_zero3.yaml").items():
        monkeypatch.setenv(key, value)
    assert launch.prepare_trainer(trainer) == len(lora)
    assert {p.dtype for p in lora} == {torch.bfloat16} and all(p.requires_grad for p in lora)


def test_prepare_final_save_gathers_a_full_state_dict_under_fsdp():
    calls = []
    plugin = SimpleNamespace(set_state_dict_type=calls.append)
    trainer = SimpleNamespace(
        is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    )
    launch.prepare_final_save(trainer)
    assert calls == ["FULL_STATE_DICT"]
    launch.prepare_final_save(SimpleNamespace(is_fsdp_enabled=False))
    assert calls == ["FULL_STATE_DICT"]


FSDP2_OUTPUT_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from accelerate.utils import FullyShardedDataParallelPlugin
from types import SimpleNamespace
from align import launch

class Head(torch.nn.Module):  # like TRL's fused LM head: fp32 log-probabilities out of bf16 compute
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 64)
    def forward(self, x):
        return torch.log_softmax(self.proj(x).float(), -1) * 30

dist.init_process_group("gloo")
plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
plugin.set_mixed_precision("bf16")  # as accelerate does for mixed_precision: bf16
# accelerate <= 1.15 also cast the root's outputs (output_dtype=bf16); 1.16 leaves them, but a user's
# fsdp_config can still ask for it: the policy of the older releases, set here so the test sees the problem
from torch.distributed.fsdp import MixedPrecisionPolicy
plugin.mixed_precision_policy = MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16, torch.bfloat16)
trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
changed = launch.fsdp2_precision(trainer) if sys.argv[1] == "fix" else False
torch.manual_seed(0)
# accelerate's fsdp2_prepare_model ends in this call with the plugin's policy (accelerate wraps with FSDP on GPUs
# only, so the CPU test calls torch's fully_shard itself)
head = Head()
x = torch.randn(4, 8)
exact = torch.log_softmax(head.proj.to(torch.bfloat16)(x.bfloat16()).float(), -1) * 30  # bf16 matmul, fp32 after
head.proj.float()
model = fully_shard(head, mesh=init_device_mesh("cpu", (1,)), mp_policy=plugin.mixed_precision_policy)
out = model(x)
print(json.dumps({"changed": changed, "dtype": str(out.dtype), "max_err": (out.float() - exact).abs().max().item()}))
dist.destroy_process_group()
"""


def test_fsdp2_keeps_fp32_log_probs_and_gradient_reduction(tmp_path):
    """accelerate's FSDP2 bf16 policy reduces gradients in bf16 and (up to 1.15) casts the root module's outputs to bf16: TRL's fused head's fp32 per-token
    log-probabilities come out rounded (steps of 0.06 near -12; summed over a completion, policy minus reference,
    that buried DPO's signal on 2 H200s). launch.fsdp2_precision keeps outputs as computed and reduces gradients
    in fp32; a real FSDP2 wrap in one CPU process shows the outputs with and without it."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    # accelerate's policy: gradients reduced in bf16 (every release), outputs cast to bf16 (up to 1.15)
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert launch.fsdp2_precision(trainer) is True
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert launch.fsdp2_precision(trainer) is False  # already fine
    assert launch.fsdp2_precision(SimpleNamespace(args=None)) is False  # no FSDP

    script = tmp_path / "fsdp2_output.py"
    script.write_text(FSDP2_OUTPUT_SCRIPT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    seen = {}
    for mode in ("stock", "fix"):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        proc = run_launcher([torchrun, "--standalone", "--nproc_per_node", "1", str(script), mode], timeout=300,
                            cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        seen[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["stock"]["dtype"] == "torch.bfloat16" and seen["stock"]["max_err"] > 0.01, seen  # rounded
    assert seen["fix"]["changed"] and seen["fix"]["dtype"] == "torch.float32", seen
    assert seen["fix"]["max_err"] < 1e-5, seen  # the values the head computed


# ------------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo) train the adapter one process trains with the same global batch


def batch_rows(inputs) -> list[str]:
    """One fingerprint per sequence of a training batch: its tokens without padding (the attention mask); a
    padding-free row (no mask, position ids restarting at 0) is split into its samples."""
    keys = sorted(k for k in inputs if k.endswith("input_ids"))
    positions = inputs.get("position_ids")
    if keys == ["input_ids"] and "attention_mask" not in inputs and positions is not None:
        ids, starts = inputs["input_ids"][0], (positions[0] == 0).nonzero().flatten().tolist()
        samples = [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)])]
        return [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:16] for x in samples]
    rows = []
    for i in range(len(inputs[keys[0]])):
        digest = hashlib.sha1()
        for key in keys:
            ids = inputs[key][i]
            mask = inputs.get(key.replace("input_ids", "attention_mask"))
            digest.update(
                ids[mask[i].bool()].cpu().numpy().tobytes()
                if mask is not None
                else ids.cpu().numpy().tobytes()
            )
        rows.append(digest.hexdigest()[:16])
    return rows


def record_batches(monkeypatch) -> list[list[str]]:
    import transformers

    seen = []
    real_step = transformers.Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        seen.append(batch_rows(inputs))
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    return seen


# Each process of the launch runs the stages' entry points (what `python align/sft.py ARGS` runs:
# sft.main(ARGS)) in turn, records its batches, world size and model wrapper, and for runs marked "nosync"
# replaces DDP by the bare model, so each process trains on its own half of every batch without the gradient
# all-reduce: the control.
TWO_PROCESS_RUNS = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist, transformers
from align import dpo, sft
from tests.test_launch import batch_rows

class BareModel(torch.nn.parallel.DistributedDataParallel):
    def __new__(cls, module, *args, **kwargs):
        return module

real_step = transformers.Trainer.training_step
real_ddp = torch.nn.parallel.DistributedDataParallel
for run in json.load(open(sys.argv[1])):
    seen = []
    def training_step(self, model, inputs, num_items_in_batch=None, seen=seen):
        seen.append(batch_rows(inputs))
        return real_step(self, model, inputs, num_items_in_batch)
    transformers.Trainer.training_step = training_step
    torch.nn.parallel.DistributedDataParallel = BareModel if run["nosync"] else real_ddp
    trainer = {"sft": sft.main, "dpo": dpo.main}[run["stage"]](run["argv"])
    rank = dist.get_rank()
    with open(f"{run['record']}.rank{rank}.json", "w") as fh:
        json.dump({"world_size": dist.get_world_size(), "rank": rank, "batches": seen,
                   "wrapper": type(trainer.model_wrapped).__name__}, fh)
"""

ATOL = 2e-5  # measured: 5.7e-6 (SFT) and 1.6e-6 (DPO); without the all-reduce: 0.12 and 0.02


def max_diff(a: str, b: str) -> float:
    wa, wb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and wa
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_cpu_processes_train_the_one_process_adapter(
    tiny_llama, chat_jsonl, preference_jsonl, tmp_path, monkeypatch
):
    """SFT, then DPO from that SFT adapter: 2 processes x batch 2 (accelerate launch with cpu_2proc.yaml,
    gloo) give the adapter of 1 process x batch 4 within ATOL; the same 2 processes without the gradient
    all-reduce do not. DPO in 2 passes a batch on each process (`passes_per_batch`: the first pass's backward
    under DDP's `no_sync`, the gradients reduced at the last) gives that adapter too.

    Exact equality is not expected: each process sums its own half of the batch and the all-reduce adds the
    two halves, a different float summation order than one process summing all four sequences, and Adam
    magnifies those last-bit differences where a gradient is near zero. The non-synced control differs by
    1000x ATOL.
    """
    common = {
        "max_steps": 3,
        "dataloader_drop_last": "true",
        "eval_split_size": 0,
        "use_cpu": "true",
        "seed": 0,
    }
    out = {
        name: str(tmp_path / name)
        for name in ("sft1", "dpo1", "sft2", "sft2_nosync", "dpo2", "dpo2_nosync", "dpo2_passes")
    }

    # one process, batch 4, in this process
    seen = record_batches(monkeypatch)
    sft.main(sft_argv(tiny_llama, chat_jsonl, out["sft1"], per_device_train_batch_size=4, **common))
    one = {"sft": list(seen)}
    seen.clear()
    dpo.main(
        dpo_argv(
            tiny_llama,
            preference_jsonl,
            out["dpo1"],
            per_device_train_batch_size=4,
            sft_adapter=out["sft1"],
            **common,
        )
    )
    one["dpo"] = list(seen)

    # two processes, batch 2 each: synced, then the non-synced control
    runs = []
    for stage, nosync in (("sft", False), ("sft", True), ("dpo", False), ("dpo", True)):
        name = f"{stage}2" + ("_nosync" if nosync else "")
        argv = (
            sft_argv(tiny_llama, chat_jsonl, out[name], per_device_train_batch_size=2, **common)
            if stage == "sft"
            else dpo_argv(
                tiny_llama,
                preference_jsonl,
                out[name],
                per_device_train_batch_size=2,
                sft_adapter=out["sft1"],
                **common,
            )
        )
        runs.append({"stage": stage, "nosync": nosync, "argv": argv, "record": str(tmp_path / name)})
    runs.append({"stage": "dpo", "nosync": False, "record": str(tmp_path / "dpo2_passes"), "argv": dpo_argv(
        tiny_llama, preference_jsonl, out["dpo2_passes"], per_device_train_batch_size=2, passes_per_batch=2,
        sft_adapter=out["sft1"], **common)})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "two_process_runs.py").write_text(TWO_PROCESS_RUNS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = run_launcher(
        [ACCELERATE, "launch", "--config_file", os.path.join(ACCELERATE_DIR, "cpu_2proc.yaml"),
         str(tmp_path / "two_process_runs.py"), str(tmp_path / "runs.json")],
        timeout=600, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for stage in ("sft", "dpo"):
        synced = [json.loads((tmp_path / f"{stage}2.rank{r}.json").read_text()) for r in (0, 1)]
        control = [json.loads((tmp_path / f"{stage}2_nosync.rank{r}.json").read_text()) for r in (0, 1)]
        # really two processes, DDP-wrapped in the synced run and bare in the control
        assert [(s["world_size"], s["rank"]) for s in synced] == [(2, 0), (2, 1)]
        assert {s["wrapper"] for s in synced} == {"DistributedDataParallel"}
        assert {s["wrapper"] for s in control} != {"DistributedDataParallel"}
        # each global batch (rank 0's half + rank 1's half) is the one process's batch
        assert len(one[stage]) == 3 and all(len(s["batches"]) == 3 for s in synced)
        for step, rows in enumerate(one[stage]):
            halves = synced[0]["batches"][step] + synced[1]["batches"][step]
            assert sorted(halves) == sorted(rows) and set(synced[0]["batches"][step]).isdisjoint(
                synced[1]["batches"][step]
            ), step
            assert control[0]["batches"][step] == synced[0]["batches"][step]
        # the same adapter within ATOL; without the all-reduce, far from it
        synced_diff = max_diff(out[f"{stage}1"], out[f"{stage}2"])
        control_diff = max_diff(out[f"{stage}1"], out[f"{stage}2_nosync"])
        print(f"{stage}: max |2 procs - 1 proc| = {synced_diff:.2e}; without all-reduce {control_diff:.2e}")
        assert synced_diff <= ATOL, (stage, synced_diff)
        assert control_diff > 100 * ATOL, (stage, control_diff)
        assert launch.check_saved_adapter(out[f"{stage}2"])["tensors"] == 28
    passes = [json.loads((tmp_path / f"dpo2_passes.rank{r}.json").read_text()) for r in (0, 1)]
    assert {p["wrapper"] for p in passes} == {"DistributedDataParallel"}
    assert [len(p["batches"]) for p in passes] == [6, 6]  # 3 steps x 2 passes of one pair on each process
    passes_diff = max_diff(out["dpo1"], out["dpo2_passes"])
    print(f"dpo, 2 passes: max |2 procs - 1 proc| = {passes_diff:.2e}")
    assert passes_diff <= ATOL, passes_diff


def test_sharded_engines_evaluate_before_training_inside_train(tiny_llama, chat_jsonl, tmp_path, monkeypatch):
    """DeepSpeed and FSDP2 refuse an evaluate() before train() (ZeRO-2: no ZeRO inference; ZeRO-3: an inference
    engine train() cannot use; FSDP2: model without optimizer; all seen on an H100). Under them the step-0
    evaluation runs inside train() (eval_on_start) and gives the same before_* metrics as the plain path."""
    from align import training

    sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / "plain"), max_steps=2))
    monkeypatch.setattr(launch, "wraps_model_at_train", lambda train_args: True)
    sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / "sharded"), max_steps=2))
    runs = {name: read_json(tmp_path / name / "run.json")["metrics"] for name in ("plain", "sharded")}
    assert runs["sharded"]["before_eval_loss"] == pytest.approx(runs["plain"]["before_eval_loss"], abs=1e-6)
    assert runs["sharded"]["eval_loss"] == pytest.approx(runs["plain"]["eval_loss"], abs=1e-5)
    history = read_json(tmp_path / "sharded" / "trainer_state.json")["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e][:1] == [0]  # evaluated at step 0, inside train()
    assert training.step0_eval([{"step": 0, "eval_loss": 1.5, "epoch": 0}, {"step": 1, "loss": 1.2}]) == {
        "before_eval_loss": 1.5, "before_epoch": 0}


FSDP2_ATOL = 1e-3
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}  # fsdp.yaml's


def test_fsdp2_config_two_cpu_processes_train_save_and_match_one_process(tiny_llama, chat_jsonl, preference_jsonl,
                                                                         tmp_path):
    """fsdp.yaml's environment, 2 CPU processes over gloo x batch 2, for SFT, DPO from the SFT adapter and the
    reward model: align's FSDP paths (the step-0 evaluation inside train(), the switch to a full state dict for
    the final save) give a full, non-empty PEFT file equal to the 1-process batch-4 adapter within FSDP2_ATOL
    (measured 1.3e-4; the non-synced control of the DDP test is at 0.12).

    accelerate shards with FSDP on GPUs only: on CPU processes AcceleratorState keeps no FSDP plugin and the
    model is wrapped in DDP, so this test does not shard. Real FSDP2 (fully_shard) runs are the GPU launch
    matrices (benchmarks/results/launch_matrix_h100_1proc.md, two_gpu_h200x2_random_1b/launch_matrix.md);
    test_fsdp2_keeps_fp32_log_probs_and_gradient_reduction wraps with fully_shard on the CPU directly."""
    # eval batch 2: with drop_last, 4 held-out rows over 2 processes x batch 4 would evaluate nothing
    common = {"max_steps": 3, "dataloader_drop_last": "true", "eval_split_size": 4, "use_cpu": "true", "seed": 0,
              "per_device_eval_batch_size": 2}
    one, two = str(tmp_path / "one"), str(tmp_path / "fsdp2")
    sft.main(sft_argv(tiny_llama, chat_jsonl, one, per_device_train_batch_size=4, **common))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", **FSDP2_ENV)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "align/sft.py"] + sft_argv(
        tiny_llama, chat_jsonl, two, per_device_train_batch_size=2, **common)
    proc = run_launcher(cmd, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert launch.check_saved_adapter(two)["tensors"] > 0
    history = read_json(os.path.join(two, "trainer_state.json"))["log_history"]
    assert history[0]["step"] == 0 and "eval_loss" in history[0]  # evaluated inside train(), before step 1
    runs = {d: read_json(os.path.join(d, "run.json"))["metrics"] for d in (one, two)}
    assert runs[two]["before_eval_loss"] == pytest.approx(runs[one]["before_eval_loss"], abs=1e-5)
    assert max_diff(one, two) < FSDP2_ATOL

    # DPO from that SFT adapter (policy = trainable copy, reference = the SFT adapter as TRL's "ref" adapter)
    dpo_one, dpo_two = str(tmp_path / "dpo_one"), str(tmp_path / "dpo_fsdp2")
    dpo.main(dpo_argv(tiny_llama, preference_jsonl, dpo_one, per_device_train_batch_size=4, sft_adapter=one,
                      **common))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "align/dpo.py"] + dpo_argv(
        tiny_llama, preference_jsonl, dpo_two, per_device_train_batch_size=2, sft_adapter=one, **common)
    proc = run_launcher(cmd, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_json(os.path.join(dpo_two, "run.json"))["metrics"]
    assert metrics["before_eval_loss"] == pytest.approx(0.6931472, abs=1e-5)  # reference = policy at step 0
    assert launch.check_saved_adapter(dpo_two)["tensors"] > 0
    assert max_diff(dpo_one, dpo_two) < FSDP2_ATOL

    # the reward model (adapter + score head) the same way (measured 8.9e-6)
    rm_one, rm_two = str(tmp_path / "rm_one"), str(tmp_path / "rm_fsdp2")
    rm.main(rm_argv(tiny_llama, preference_jsonl, rm_one, per_device_train_batch_size=4, **common))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "align/rm.py"] + rm_argv(
        tiny_llama, preference_jsonl, rm_two, per_device_train_batch_size=2, **common)
    proc = run_launcher(cmd, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any("score" in k for k in load_file(os.path.join(rm_two, "adapter_model.safetensors")))
    assert max_diff(rm_one, rm_two) < FSDP2_ATOL


def test_launch_matrix_random_rows_fit_and_references_spread_over_gpus(tmp_path, monkeypatch):
    """benchmarks/launch_matrix.py: random-token rows stay within TOKENS once templated (decoded random ids
    re-tokenize longer: the first 2-GPU matrix dropped every row as too long), and with --parallel 1 on a host of
    two GPUs the one-process references run side by side, one per GPU, every multi-process run alone."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import launch_matrix

    from align.testing import load_test_tokenizer

    tok_dir = str(tmp_path / "tok")
    tok = load_test_tokenizer()
    tok.save_pretrained(tok_dir)
    for tokens in (64, 256):
        files = launch_matrix.write_random_data(tok_dir, str(tmp_path / f"data{tokens}"), 12, tokens)
        lengths = []
        for line in open(files["sft"][0]):
            msgs = json.loads(line)["messages"]
            lengths.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]))
        for line in open(files["preference"][0]):
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                ids = tok.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
                lengths.append(len(ids))
        assert max(lengths) <= tokens and min(lengths) > tokens // 2, (tokens, lengths)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = SimpleNamespace(out=str(tmp_path), num_processes=2, model="m", max_steps=8, data_files=None, extra=[])
    jobs = [launch_matrix.job(c, s, args, 29600 + i) for i, (c, s) in enumerate(
        [("single_gpu", "sft"), ("single_gpu_qlora", "sft"), ("multi_gpu", "sft"), ("single_gpu", "dpo"),
         ("fsdp", "sft")])]
    waves = launch_matrix.waves(jobs, 1)
    gpus = [[j["cmd"][j["cmd"].index("--gpu_ids") + 1] if "--gpu_ids" in j["cmd"] else None for j in w]
            for w in waves]
    assert gpus == [["0", "1"], ["0"], [None], [None]]
    assert [len(w) for w in launch_matrix.waves(jobs, 2)] == [2, 2, 1]  # --parallel 2: plain groups


def test_a_timed_out_launch_takes_its_workers_with_it():
    """tests' `run_launcher`: on a timeout the launcher's whole session is killed, the worker it started too
    (`subprocess.run` kills only the launcher and leaves its workers running), and the output so far comes with
    the `TimeoutExpired`."""
    import time

    launcher = ("import subprocess, sys, time\n"
                "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                "print(w.pid, flush=True)\n"
                "time.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_launcher([sys.executable, "-c", launcher], timeout=5)
    worker = int(err.value.stdout.split()[0])

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while running(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(worker)
