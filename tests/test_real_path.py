"""The lab's real path, rehearsed offline: every command of train.txt and test.txt, read from
the files and run as written, each as its own process, from a fresh copy of the repository
whose ./data is empty.

Nothing is mocked inside the scripts:
- pretrained weights are stand-ins in a temporary $TORCH_HOME hub cache, under torchvision's
  own file names (conftest.hub_cache), which torch reads before it would download;
- PASCAL VOC and SBD are tiny generated archives laid out like the real ones, served by an
  HTTP server on 127.0.0.1; torchvision's URLs and checksums point there (rehearsal_site/
  sitecustomize.py), so the real download -> check -> extract -> load code runs.
Appended to each line are only flags that shrink the work (SHRINK).
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec

import numpy as np
import pytest
from conftest import REPO
from contract_pdf import reproduce_row, write_contract_pdf
from PIL import Image
from scipy.io import savemat

import typeset
from pack import evaluations
from synth import synth_sample, write_synth_voc

SITE = REPO / "tests" / "rehearsal_site"
TRAIN = ["--epochs", "1", "--limit-train", "4", "--limit-val", "2", "--batch-size", "2",
         "--crop-size", "64"]
SHRINK = {  # script -> flags appended to its lines: fewer epochs, images, runs, smaller sizes
    "train_kd.py": TRAIN,
    "demo.py": ["--train", "8", "--val", "4", "--select", "4", "--pretrain", "8", "--size", "40",
                "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "4", "--crop-size", "40",
                "--seeds", "0", "1"],  # its default --jobs 2: runs in spawned processes
    "test_teacher.py": ["--limit", "2"],
    "evaluate.py": ["--limit", "2", "--num_images", "2"],
    "benchmark.py": ["--size", "64", "--batch", "2", "--runs", "1", "--warmup", "0"],
    "compress.py": ["--limit", "2", "--calib-images", "2", "--size", "64",
                    "--runs", "1", "--warmup", "0"],
    "report.py": [],
}
OPTIONAL_INSTALLED = all(find_spec(m) for m in ("torchao", "torch_pruning", "onnx",
                                                "onnxscript", "onnxruntime"))


def lab_lines(name):
    return [line for line in (REPO / name).read_text().splitlines() if line.startswith("python ")]


# --------------------------------------------------------------------------- the downloads

def voc_archive(folder):
    """VOCtrainval_11-May-2012.tar as the real one is laid out: VOCdevkit/VOC2012/..."""
    write_synth_voc(folder / "tree", n_train=8, n_val=4, size=64, seed=5, num_object_classes=4)
    path = folder / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(folder / "tree" / "VOCdevkit", arcname="VOCdevkit")
    return path


def sbd_archive(folder, voc_val_id):
    """benchmark.tgz (benchmark_RELEASE/dataset/{img,cls,inst,train.txt,val.txt}) and the
    train_noval.txt split; one SBD id is a VOC val image, which trainaug must leave out."""
    dataset = folder / "sbd" / "benchmark_RELEASE" / "dataset"
    for sub in ("img", "cls", "inst"):
        (dataset / sub).mkdir(parents=True)
    rng = np.random.default_rng(7)
    ids = ["2008_000001", "2008_000002", "2008_000003", voc_val_id]
    for name in ids:
        image, label = synth_sample(rng, 64, 72, num_object_classes=4)
        Image.fromarray(image).save(dataset / "img" / f"{name}.jpg")
        for sub in ("cls", "inst"):
            savemat(dataset / sub / f"{name}.mat", {"GTcls": {"Segmentation": label}})
    (dataset / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (dataset / "val.txt").write_text(ids[3] + "\n")
    (folder / "train_noval.txt").write_text("\n".join(ids) + "\n")
    path = folder / "benchmark.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "sbd" / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return path, folder / "train_noval.txt"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def download_server(tmp_path_factory):
    """The archives behind an HTTP server on 127.0.0.1; yields what sitecustomize reads."""
    folder = tmp_path_factory.mktemp("served")
    voc = voc_archive(folder)
    val_id = (folder / "tree/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[0]
    sbd, split = sbd_archive(folder, val_id)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()
    yield {"voc": f"{base}/{voc.name}", "voc_md5": md5(voc), "sbd": f"{base}/{sbd.name}",
           "sbd_md5": md5(sbd), "sbd_split": f"{base}/{split.name}", "sbd_split_md5": md5(split)}
    server.shutdown()


# --------------------------------------------------------------------------- running

def fresh_copy(dst):
    """The files a clone would hold (tracked, plus new ones git does not ignore)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


def rehearsal_env(hub_cache, urls):
    env = dict(os.environ, TORCH_HOME=str(hub_cache), PYTHONPATH=str(SITE),
               KD_REHEARSAL=json.dumps(urls), MPLBACKEND="Agg")
    env["OMP_NUM_THREADS"] = "1"  # two commands share the two cores; more threads only wait
    return env


def run_line(line, cwd, env, extra=()):
    """A line as a user pastes it (python -> this interpreter), plus the SHRINK flags."""
    argv = shlex.split(line)
    argv = [sys.executable, *argv[1:], *SHRINK[argv[1]], *extra]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    print(f"{time.perf_counter() - start:6.1f} s  {line[:100]}")  # shown by pytest -s
    return line, proc


def failures_of(done):
    return [f"$ {line}\n(exit {p.returncode})\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
            for line, p in done if p.returncode != 0]


def script_of(line):
    return shlex.split(line)[1]


# --------------------------------------------------------------------------- the rehearsal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rehearsal(hub_cache, download_server, tmp_path_factory):
    """Every line, run once for the module's tests: (fresh copy, the failures)."""
    repo = fresh_copy(tmp_path_factory.mktemp("rehearsal") / "repo")
    env = rehearsal_env(hub_cache, download_server)
    train, test = lab_lines("train.txt"), lab_lines("test.txt")
    assert len(train) >= 5 and len(test) >= 5
    of = lambda *scripts: [line for line in test if script_of(line) in scripts]
    if not OPTIONAL_INSTALLED:  # compress.py's line needs requirements-optional.txt (CI has it)
        test = [line for line in test if script_of(line) != "compress.py"]
    run = lambda line, *extra: pool.submit(run_line, line, repo, env, extra)
    # two commands at a time, each started as soon as what it reads exists
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = run(train[0])  # meets an empty ./data: downloads VOC
        no_data = [run(line) for line in train if script_of(line) == "demo.py"]
        no_data += [run(line) for line in of("benchmark.py")]
        first.result()
        trained = [run(line) for line in of("compress.py")]  # reads the first run's checkpoint
        pruned_later = [line for line in train if "--init-from" in line]  # reads compress's
        trained += [run(line) for line in train[1:]
                    if script_of(line) != "demo.py" and line not in pruned_later]
        trained += [run(line) for line in of("test_teacher.py")]
        trained.append(run(train[0], "--train-set", "trainaug", "--out", "trainaug"))  # + SBD
        wait(trained)  # the evaluations score what these runs trained
        later = of("evaluate.py") + (pruned_later if OPTIONAL_INSTALLED else [])
        scored = [run(line) for line in later]
        done = [f.result() for f in [first, *no_data, *trained, *scored]]
        done += [run(line).result() for line in of("report.py")]
    return repo, failures_of(done)


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_every_line_of_train_and_test_txt_runs_as_written(rehearsal):
    repo, failures = rehearsal
    assert not failures, "\n\n".join(failures)
    data = repo / "data"
    assert (data / "VOCtrainval_11-May-2012.tar").is_file()  # came through the download
    assert (data / "SBD" / "train_noval.txt").is_file() and (data / "SBD" / "img").is_dir()
    assert read(repo, "outputs/trainaug/summary.json")["args"]["train_set"] == "trainaug"
    teacher = read(repo, "outputs/teacher_eval.json")
    assert teacher["params"] == 35_322_218 and teacher["weights"] == "default"
    for line in lab_lines("train.txt"):
        argv = shlex.split(line)
        if "--out" in argv:
            name = argv[argv.index("--out") + 1]
            summary = read(repo, f"outputs/{name}/summary.json")
            assert summary["args"]["pretrained_backbone"] is True  # from the hub cache
            assert (repo / "models" / f"{name}_last.pth").is_file()
    for line in lab_lines("test.txt"):
        argv = shlex.split(line)
        if "--json" in argv and (script_of(line) != "compress.py" or OPTIONAL_INSTALLED):
            assert (repo / argv[argv.index("--json") + 1]).is_file(), line
    assert "PASCAL VOC 2012 val (test.txt)" in (repo / "report" / "README.md").read_text()


def test_the_demo_line_scores_every_method_with_evaluate(rehearsal):
    repo, failures = rehearsal
    results = read(repo, "outputs/demo_results.json")
    assert [row["method"] for row in results["rows"]] == \
        ["teacher", "no_kd", "response_kd", "feature_kd", "combined_kd"]
    for row in results["rows"]:  # the table holds what evaluate.py wrote, seed by seed
        evaluations = [read(repo, p) for p in row["evaluations"]]
        assert row["mious"] == [e["miou"] for e in evaluations]
        assert all(e["split"] == "val" and e["checkpoint"].endswith("_last.pth") for e in evaluations)
        assert row["n"] == (1 if row["method"] == "teacher" else 2)
    logs = list((repo / "outputs" / "sweep").glob("demo_students_*/logs/*.log"))
    assert len(logs) == 8  # --jobs 2: each run in its own process, with its own log
    assert (repo / "plots/demo_comparison.png").is_file()


@pytest.mark.skipif(not OPTIONAL_INSTALLED, reason="compress.py needs requirements-optional.txt")
def test_the_compress_line_writes_every_variant(rehearsal):
    """int8 runs, pruning reaches its sparsity, ONNX matches PyTorch, files load alone."""
    import torch

    from nets import model_from_checkpoint
    from runtimes import load_any, load_int8
    repo, failures = rehearsal
    result = read(repo, "outputs/compress.json")
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "int8", "pruned_unstructured", "pruned_channels", "onnx"}
    assert result["onnx_max_abs_diff"] <= 1e-4
    assert rows["onnx"]["miou"] == pytest.approx(rows["fp32"]["miou"], abs=1e-6)
    assert rows["pruned_unstructured"]["zero_fraction"] == pytest.approx(0.5, abs=0.02)
    for row in rows.values():
        assert row["size_bytes"] > 0 and row["median_ms"] > 0 and 0 <= row["miou"] <= 1
    assert rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"]
    # the saved int8 program runs on its own, at a size it was not calibrated on
    program = load_int8(repo / rows["int8"]["file"])  # in this process, not the one that wrote it
    with torch.no_grad():
        logits = program(torch.randn(1, 3, 72, 88))
    assert logits.shape == (1, 21, 72, 88) and torch.isfinite(logits).all()
    # the int8 and ONNX files say what they came from (evaluate.py, benchmark.py read it)
    source = model_from_checkpoint(repo / result["checkpoint"])[1]["model_args"]
    for variant in ("int8", "onnx"):
        _, record = load_any(repo / rows[variant]["file"])
        assert record["model_args"] == source and record["source"] == result["checkpoint"]
    assert result["int8_runtime"] == "inductor (freezing)"  # the path users run, not --int8-eager
    # a pruned checkpoint loads like any other, and train.txt's line fine-tunes it
    model, _ = model_from_checkpoint(repo / rows["pruned_channels"]["file"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)
    tuned = read(repo, "outputs/no_kd_pruned50_kd/summary.json")
    assert tuned["args"]["init_from"] == rows["pruned_channels"]["file"]
    assert tuned["teacher"] == "lite" and tuned["args"]["teacher_weights"] == result["checkpoint"]
    assert tuned["params"] == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the submission

def report_pdf(repo):
    """report/report.pdf as test.txt's report.py line wrote it, with the lab's page count."""
    pdf = repo / "report" / "report.pdf"
    assert pdf.is_file(), "test.txt's report.py line wrote no report/report.pdf"
    assert 4 <= len(typeset.pdf_pages(pdf)) <= 6
    return pdf


def run_pack(repo, env, *argv):
    proc = subprocess.run([sys.executable, "pack.py", *argv], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-3000:])
    return proc


@pytest.fixture(scope="module")
def submission(rehearsal, hub_cache, download_server):
    """pack.py on the rehearsal's results: (repo, env, the zip)."""
    repo, failures = rehearsal
    assert not failures, "\n\n".join(failures)
    report_pdf(repo)
    env = rehearsal_env(hub_cache, download_server)
    proc = run_pack(repo, env, "--student-number", "12345678")
    assert proc.returncode == 0, proc.stderr
    return repo, env, repo / "12345678.zip"


def test_pack_and_check_pass_on_the_rehearsals_own_results(submission):
    repo, env, zip_path = submission
    proc = run_pack(repo, env, "--check", zip_path.name, "--data-root", "data",
                    "--json", "outputs/pack_check.json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    [result] = read(repo, "outputs/pack_check.json")["submissions"]
    runs = [r for r in result["rows"] if r["check"].startswith("mIoU ")]
    assert len(runs) == len([line for line in lab_lines("test.txt")
                             if script_of(line) in ("test_teacher.py", "evaluate.py")])
    assert all(r["ok"] == "yes" for r in runs)  # every one compared, the teacher's too


def test_three_broken_zips_of_the_rehearsal_fail_naming_the_file_or_run(submission, tmp_path):
    """A checkpoint swapped for another run's, a missing one, a report claiming more."""
    repo, env, good = submission
    with zipfile.ZipFile(good) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    # the true table with no_kd's mIoU 3 points higher
    rows = [reproduce_row(repo / result, "x") for _, _, result in evaluations(repo)]
    rows = [(r[0], f"{float(r[1]) + 3:.2f}" if r[0] == "no_kd_eval.json" else r[1], *r[2:])
            for r in rows]
    edited_pdf = write_contract_pdf(tmp_path / "edited.pdf", rows)
    broken = {
        "swapped": {**files, "models/no_kd_last.pth": files["models/response_kd_last.pth"]},
        "missing": {n: b for n, b in files.items() if n != "models/no_kd_last.pth"},
        "edited": {**files, "report/report.pdf": edited_pdf.read_bytes()},
    }
    zips = []
    for kind, content in broken.items():
        path = tmp_path / kind / "12345678.zip"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in content.items():
                zf.writestr(name, data)
        zips.append(str(path))
    proc = run_pack(repo, env, "--check", *zips, "--data-root", "data", "--skip-teacher",
                    "--json", str(tmp_path / "broken.json"), "--sheet", str(tmp_path / "s.csv"))
    assert proc.returncode == 1, proc.stderr
    swapped, missing, edited = json.loads((tmp_path / "broken.json").read_text())["submissions"]
    failed = lambda r: {x["check"].split(" (")[0] for x in r["rows"] if x["ok"] == "NO"}
    assert "checkpoint models/no_kd_last.pth" in failed(swapped)
    assert {"checkpoint models/no_kd_last.pth", "rerun no_kd_eval.json"} <= failed(missing)
    assert "mIoU no_kd_eval.json" in failed(edited)
    assert not {c for c in failed(edited) if c.startswith("mIoU ") and "no_kd" not in c}
