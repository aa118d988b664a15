"""align/training.py helpers that run every step: the once-per-step `train()` shortcut and the loss guard's
deferred check (CPU)."""

import math
import types

import pytest
import torch

from align.training import NonFiniteLossError, NonFiniteLossGuard, train_mode_once


class Counting(torch.nn.Linear):
    walks = 0

    def train(self, mode: bool = True):
        type(self).walks += 1
        return super().train(mode)


def model_with_counter():
    Counting.walks = 0
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(Counting(2, 2), torch.nn.Dropout(0.1)))


def test_train_mode_once_skips_the_walk_only_while_every_module_trains():
    model = model_with_counter()
    model.eval()
    Counting.walks = 0
    with train_mode_once(model):
        model.train()  # some module is in eval: a real walk
        assert Counting.walks == 1 and all(m.training for m in model.modules())
        model.train()
        model.train()
        assert Counting.walks == 1  # all training: skipped
        model[1][1].eval()  # a module left in eval mode (as an eval loop does) is found and reset
        model.train()
        assert Counting.walks == 2 and model[1][1].training
        model.train(False)  # eval is never skipped
        assert Counting.walks == 3 and not any(m.training for m in model.modules())
    assert "train" not in model.__dict__  # the class method is back after the step
    model.train()
    assert Counting.walks == 4


def test_train_mode_once_leaves_engines_with_their_own_train_alone():
    class Engine(torch.nn.Module):  # e.g. DeepSpeed's engine, whose train() does more than set flags
        calls = 0

        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def train(self, mode: bool = True):
            Engine.calls += 1
            return super().train(mode)

    engine = Engine()
    with train_mode_once(engine):
        engine.train()
        engine.train()
    assert Engine.calls == 2 and "train" not in engine.__dict__


class _Base:
    """Stands in for a TRL trainer: training_step returns the next loss of a list."""

    def __init__(self, losses, output_dir="out"):
        self.losses = list(losses)
        self.args = types.SimpleNamespace(logging_nan_inf_filter=True, output_dir=output_dir)
        self.state = types.SimpleNamespace(global_step=0, epoch=0.0)
        self.logged = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        return torch.tensor(self.losses.pop(0))

    def log(self, logs, start_time=None):
        self.logged.append(logs)

    def train(self, steps):
        model = torch.nn.Linear(2, 2)
        for _ in range(steps):
            self.training_step(model, {})
            self.state.global_step += 1


class _Guarded(NonFiniteLossGuard, _Base):
    pass


def run_steps(trainer, n):
    trainer.train(n)


def test_guard_stops_at_the_step_whose_loss_is_not_finite_and_turns_the_filter_off():
    trainer = _Guarded([1.0, 0.5, math.inf, 0.2])
    with pytest.raises(NonFiniteLossError, match=r"training loss is inf at step 3 \(epoch 0.00\).*out"):
        run_steps(trainer, 4)
    assert trainer.args.logging_nan_inf_filter is False
    assert trainer.losses == [0.2]  # stopped right after step 3 on CPU (no copy to wait for)


def test_guard_off_keeps_stock_behaviour():
    trainer = _Guarded([1.0, math.nan])
    trainer.stop_on_nonfinite_loss = False
    run_steps(trainer, 2)
    assert trainer.args.logging_nan_inf_filter is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the non-blocking copy path needs CUDA")
def test_guard_checks_pending_cuda_losses_before_a_log_line():
    class CudaBase(_Base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return torch.tensor(self.losses.pop(0), device="cuda")

    class G(NonFiniteLossGuard, CudaBase):
        pass

    trainer = G([1.0, math.nan])
    for _ in range(2):  # steps without train()'s final check: the NaN may still be in flight
        trainer.training_step(torch.nn.Linear(2, 2), {})
        trainer.state.global_step += 1
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.log({"loss": 0.0})
    assert trainer.logged == []


def _lora_run(trainer_cls, tmp_path, name):
    """Three clipped steps of a tiny Llama with LoRA under `trainer_cls`: (trainer, model, LoRA weights after)."""
    import datasets
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (6, 12), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        max_grad_norm=0.01, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer, model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_parameter_scans_keep_trainer_values_with_one_walk(tmp_path, monkeypatch):
    """`CachedParameterScans`: the same total_flos, clipped gradient norms and trained weights as Trainer's
    per-step walks, with the parameter count taken once and the model's own `zero_grad` back after training."""
    import transformers

    from align.training import CachedParameterScans

    class Cached(CachedParameterScans, transformers.Trainer):
        pass

    stock, _, want = _lora_run(transformers.Trainer, tmp_path, "stock")
    counts = []
    real = transformers.PreTrainedModel.num_parameters
    monkeypatch.setattr(transformers.PreTrainedModel, "num_parameters",
                        lambda self, *a, **k: counts.append(1) or real(self, *a, **k))
    cached, model, got = _lora_run(Cached, tmp_path, "cached")
    assert len(counts) == 1  # once, not once per step
    assert cached.state.total_flos == stock.state.total_flos > 0
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in (cached, stock)]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-6)
    assert min(norms[0]) > 0.01  # the clip was active: the weights below depend on it
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the last step
    assert "zero_grad" not in model.__dict__
