"""Speed metrics written into run.json: step times and tokens/s from hand-made clocks and logs."""

from types import SimpleNamespace

import pytest
import torch

from align import run_stats


def test_step_times_and_tokens_per_second_by_hand():
    ends = {1: 10.0, 2: 11.0, 3: 11.5, 4: 12.0, 5: 12.5}
    assert run_stats.step_times(ends, start=8.0) == [2.0, 1.0, 0.5, 0.5, 0.5]
    logs = [{"step": s, "loss": 1.0, "num_tokens": 100 * s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 1.0}]
    # tokens between the end of step 2 and step 5: 300, over 1.5 s
    assert run_stats.tokens_per_second(ends, logs, warmup=2) == pytest.approx(200.0)
    assert run_stats.tokens_per_second(ends, logs[:2], warmup=2) is None  # fewer than two logged timed steps


def test_summarize_skips_warmup_and_gpu_memory_on_cpu():
    clock = run_stats.StepClock()
    clock.start, clock.ends = 0.0, {1: 5.0, 2: 6.0, 3: 7.0, 4: 8.5}
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[
        {"step": s, "loss": 1.0, "num_tokens": 64 * s} for s in range(1, 5)]), accelerator=None)
    out = run_stats.summarize(clock, trainer, warmup=2)
    assert out["train_step_s_median"] == pytest.approx(1.25)  # steps 3 and 4: 1.0 and 1.5 s (not the 5 s first)
    assert out["train_tokens_per_s"] == pytest.approx(128 / 2.5)
    assert ("train_peak_memory_gib" in out) == torch.cuda.is_available()  # GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_step_clock_times_gpu_steps_from_events_without_a_sync_per_step():
    clock = run_stats.StepClock()
    clock.on_train_begin(None, None, None)
    for step in (1, 2, 3):
        torch.cuda._sleep(50_000_000 * step)  # GPU-side work of growing length, queued without waiting
        clock.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert clock.ends == {}  # nothing read yet
    clock.finalize()
    times = run_stats.step_times(clock.ends, clock.start)
    assert len(times) == 3 and times[0] < times[1] < times[2] and clock.ends[3] <= __import__("time").perf_counter()


def test_results_with_the_per_rank_memory_list_are_written_and_printed(tmp_path, capsys):
    """On GPUs run.json's metrics hold a list (peak memory per rank), which Trainer.log_metrics cannot format: the
    results files keep it, the console table shows the scalars (a 2-GPU run failed here after training)."""
    import json

    import transformers

    from align import training

    class Stub:
        args = SimpleNamespace(output_dir=str(tmp_path))
        is_world_process_zero = staticmethod(lambda: True)
        log_metrics = transformers.Trainer.log_metrics
        save_metrics = transformers.Trainer.save_metrics
        metrics_format = transformers.Trainer.metrics_format

    metrics = {"train_loss": 1.5, "train_peak_memory_gib": 3.0, "train_peak_memory_gib_per_rank": [3.0, 2.5]}
    training.write_results(Stub(), "train", metrics)
    assert json.loads((tmp_path / "train_results.json").read_text())["train_peak_memory_gib_per_rank"] == [3.0, 2.5]
    printed = capsys.readouterr().out
    assert "train_loss" in printed and "per_rank" not in printed
