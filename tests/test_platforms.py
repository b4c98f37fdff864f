"""What differs between the lab's platforms (macOS with MPS, Windows, Colab, Linux GPUs),
with each platform's condition simulated on this CPU machine."""
import argparse
import os
import signal
import subprocess

import pytest
import torch

import checkpoints
import cli
import compute
import engine
import files

# --------------------------------------------------------------------------- devices

def test_auto_device_says_when_an_nvidia_gpu_meets_a_cpu_only_torch(monkeypatch, capsys):
    """Windows' PyPI torch is CPU-only: with an NVIDIA GPU present, say so and how to fix it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(compute.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(compute.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-x)\n", stderr=""))
    assert compute.resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: ")
    assert "NVIDIA GPU" in err and "without CUDA" in err and "install selector" in err
    # no GPU (nvidia-smi fails), or a CUDA build of torch: nothing to say
    monkeypatch.setattr(compute.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 9, stdout="", stderr="NVIDIA-SMI has failed"))
    compute.resolve_device("auto")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(compute.subprocess, "run", lambda *a, **k: pytest.fail("not asked"))
    compute.resolve_device("auto")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("scaler_on_mps, dtype", [(True, torch.float16), (False, torch.bfloat16)])
def test_one_amp_rule_for_mps_with_loss_scaling_where_torch_has_it(monkeypatch, scaler_on_mps,
                                                                   dtype):
    monkeypatch.setattr(compute, "mps_grad_scaler_supported", lambda: scaler_on_mps)
    mps = torch.device("mps")
    assert compute.amp_dtype(mps, True) == dtype and compute.amp_dtype(mps, False) is None
    assert compute.grad_scaler(mps, True).is_enabled() == (dtype == torch.float16)
    # the same rule elsewhere: fp16 and scaling on CUDA, bf16 and no scaling on a CPU
    assert compute.amp_dtype(torch.device("cuda"), True) == torch.float16
    assert compute.amp_dtype(torch.device("cpu"), True) == torch.bfloat16
    assert not compute.grad_scaler(torch.device("cpu"), True).is_enabled()


def test_mps_grad_scaler_support_follows_the_torch_version(monkeypatch):
    for version, supported in (("2.7.1", False), ("2.8.0", True), ("2.15.0+cu132", True),
                               ("3.0.0", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert compute.mps_grad_scaler_supported() == supported, version


def test_resume_state_holds_the_mps_generator(monkeypatch):
    saved = torch.tensor([7, 7, 7], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    state = checkpoints.rng_state()
    assert torch.equal(state["mps"], saved)
    checkpoints.set_rng_state(state)
    assert restored and torch.equal(restored[0], saved)


def test_cudnn_autotuning_is_off_during_full_size_evaluation(monkeypatch):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return torch.zeros(x.shape[0], 21, *x.shape[-2:])

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    batch = [(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8, dtype=torch.uint8))]
    engine.evaluate(Probe(), batch, torch.device("cpu"), warmup=0, progress=False)
    assert seen == [False] and torch.backends.cudnn.benchmark is True  # restored after


# --------------------------------------------------------------------------- Windows

def test_save_retries_a_file_another_program_holds_then_succeeds(tmp_path, monkeypatch):
    real, calls = os.replace, []

    def locked_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", str(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", locked_twice)
    monkeypatch.setattr(files.time, "sleep", lambda s: None)
    files.save_json({"epoch": 3}, tmp_path / "summary.json")
    assert len(calls) == 3 and (tmp_path / "summary.json").read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


def test_save_to_a_file_that_stays_locked_keeps_the_data_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "run_last.pth"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (_ for _ in ()).throw(
        PermissionError(13, "The process cannot access the file", str(dst))))
    monkeypatch.setattr(files.time, "sleep", lambda s: None)
    with pytest.raises(cli.UserError) as err:
        files.torch_save({"epoch": 4}, target)
    message = str(err.value)
    kept = [p for p in tmp_path.iterdir() if p.name != "run_last.pth"]
    assert len(kept) == 1 and str(kept[0]) in message and "\n" not in message
    assert torch.load(kept[0], weights_only=True) == {"epoch": 4}  # the new data is safe
    assert target.read_bytes() == b"the previous checkpoint"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="simulates SIGBREAK with SIGUSR1")
def test_ctrl_break_stops_a_run_like_sigterm(monkeypatch):
    """Where SIGBREAK exists (Windows; simulated here by SIGUSR1) it asks for a stop."""
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    with files.StopRequest(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handler restored


# --------------------------------------------------------------------------- flags

ENTRY = ["train_kd", "test_teacher", "evaluate", "demo", "benchmark", "compress", "report", "sweep",
         "data", "plots", "typeset"]


@pytest.mark.parametrize("name", ENTRY)
def test_every_flag_shows_its_default_in_help(name):
    parser = __import__(name).get_args_parser()
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    for p in parsers:
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                text = formatter._expand_help(action) if action.help else ""
                assert "default" in text, f"{name}: {action.option_strings[0]}: {text!r}"


# --------------------------------------------------------------------------- CPU threads

@pytest.fixture
def eight_cores(monkeypatch):
    """A machine of 8 cores on which torch would use all 8; torch's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(compute, "usable_cores", lambda: 8)
    monkeypatch.setattr(compute, "TORCH_DEFAULT_THREADS", 8)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("device, busy, workers, expected", [
    ("cpu", 0, None, (1, 7)),    # auto workers on a CPU: one per 8 cores; the rest compute
    ("cpu", 3, None, (1, 4)),    # three cores taken by other programs at start
    ("cpu", 3, 2, (2, 3)),       # --workers 2 each take a core
    ("cpu", 12, 0, (0, 1)),      # a machine busier than its cores: still one thread
    ("cuda", 0, None, (8, 1)),   # a GPU is fed by one worker per core, up to 8
])
def test_threads_leave_the_cores_to_workers_and_busy_programs(eight_cores, device, busy,
                                                               workers, expected):
    args = argparse.Namespace(threads=None, workers=workers)
    line = compute.set_compute_resources(args, torch.device(device), busy=busy)
    assert (args.workers, args.threads) == expected
    assert torch.get_num_threads() == expected[1]
    assert line == (f"threads: {expected[1]} (auto: 8 cores, {expected[0]} workers, {busy} busy "
                    f"with other programs); workers: {expected[0]}")


def test_threads_flag_overrides_the_choice(eight_cores):
    args = argparse.Namespace(threads=5, workers=0)
    assert compute.set_compute_resources(args, torch.device("cpu"), busy=7).startswith(
        "threads: 5 (--threads)")
    assert torch.get_num_threads() == 5


def test_busy_cores_counts_a_busy_program(monkeypatch):
    """psutil's machine-wide CPU use, in whole cores: one busy core of 4 is 25%."""
    import psutil
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for percent, cores in ((0.0, 0), (10.0, 0), (25.0, 1), (60.0, 2), (100.0, 4)):
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval, p=percent: p)
        assert compute.busy_cores() == cores


def test_a_cpu_is_named_with_the_instructions_that_choose_its_kernels(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert compute.cpu_features({"avx2", "avx512f"}) == "AVX512"
    assert compute.cpu_features({"avx512f", "avx512_vnni", "amx_tile"}) == "AVX512 VNNI AMX"
    name = compute.device_name(torch.device("cpu"))  # this machine's, whatever it is
    threads = torch.get_num_threads()
    assert name.startswith("CPU (") and ", AVX512" in name
    assert name.endswith(f", {threads} thread{'s' if threads > 1 else ''})")
