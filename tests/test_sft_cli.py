"""The SFT stage from the command line: accelerate launch, and resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from .conftest import REPO
from .test_sft import sft_argv

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def test_accelerate_launch_sft_with_a_recipe(tiny_llama, chat_jsonl, tmp_path):
    out = str(tmp_path / "cli")
    cmd = [ACCELERATE, "launch", "--num_processes", "1", "--mixed_precision", "no", "align/sft.py",
           "--config", "recipes/smollm2/sft_lora.yaml", "--model_name_or_path", tiny_llama,
           "--dataset_name", chat_jsonl, "--output_dir", out, "--max_steps", "3", "--bf16", "false",
           "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sft: wrote" in proc.stdout
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    # an unknown key fails before any work, naming the key
    bad = subprocess.run([sys.executable, "align/sft.py", "--config", "recipes/smollm2/sft_lora.yaml", "--lora_rnak", "4"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown key 'lora_rnak'" in bad.stderr


def test_killed_run_resumes_to_the_same_adapter(tiny_llama, chat_jsonl, tmp_path):
    common = dict(max_steps=10, save_strategy="steps", save_steps=2, lora_dropout=0.1, eval_split_size=0,
                  learning_rate="1e-2")
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    run = [sys.executable, "align/sft.py"]
    subprocess.run(run + sft_argv(tiny_llama, chat_jsonl, whole, **common), cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=600)

    argv = run + sft_argv(tiny_llama, chat_jsonl, resumed, **common)
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isfile(os.path.join(resumed, "checkpoint-4", "trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its 4th step was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isfile(os.path.join(resumed, "adapter_model.safetensors"))  # it really was cut short

    again = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    a = load_file(os.path.join(whole, "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
