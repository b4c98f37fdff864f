"""pack.py: the zip it writes, what it refuses, and --check on a good zip and on broken ones.

The fixture is a small lab: the repository's code copied into a folder that is not a git
checkout (the walk path), a tiny generated VOC tree, two random-weight 'lite' checkpoints
whose heads favour different classes (so their mIoUs differ for sure), one of which
test.txt names, the real evaluate.py run once for its result file, and a PDF made as the
report contract states (tests/contract_pdf.py) with the true numbers.
"""
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import REPO
from contract_pdf import reproduce_row, write_contract_pdf

import pack
from synth import write_synth_voc

EVAL_LINE = ("python evaluate.py --model_path models/a_last.pth --data-root ./data --device cpu "
             "--threads 1 --workers 0 --json outputs/a_eval.json --visualize --num_images 2")
TEST_TXT = f"""# the lab's evaluations
python test_teacher.py --data-root ./data --weights default --device cpu --json outputs/teacher_eval.json
{EVAL_LINE}
python benchmark.py --device cpu --json outputs/benchmark.json
"""


def checkpoint(path, favoured, seed):
    """A random 'lite' student whose head adds 20 to one class: it predicts that class."""
    from nets import build_model
    torch.manual_seed(seed)
    model = build_model("lite")
    with torch.no_grad():
        model.classifier.bias[favoured] += 20
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": dict(model.model_args), "epoch": 1}, path)


def evaluate_line(repo, voc):
    """test.txt's evaluate line run in this process, as the student ran it (first 3 images)."""
    import evaluate
    argv = shlex.split(EVAL_LINE)[2:] + ["--data-root", str(voc), "--no-download", "--limit", "3"]
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        evaluate.main(evaluate.get_args_parser().parse_args(argv))
    finally:
        os.chdir(cwd)


def make_lab(base):
    repo, voc = base / "repo", base / "voc"
    repo.mkdir()
    for path in [*REPO.glob("*.py"), *REPO.glob("requirements*.txt"), REPO / "README.md"]:
        shutil.copy2(path, repo / path.name)
    write_synth_voc(voc, n_train=1, n_val=4, size=40, seed=3, num_object_classes=2)
    (repo / "test.txt").write_text(TEST_TXT)
    (repo / "train.txt").write_text("python train_kd.py --out a --epochs 1\n")
    checkpoint(repo / "models/a_last.pth", favoured=0, seed=0)
    checkpoint(repo / "models/other_last.pth", favoured=1, seed=1)  # nobody names it
    for junk in ("data/VOCdevkit/x.jpg", ".venv/lib/site.py", "__pycache__/pack.cpython.pyc",
                 "outputs/__pycache__/z.pyc"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_text("never packed")
    (repo / "plots").mkdir()
    (repo / "plots/a_curves.png").write_bytes(b"png")
    evaluate_line(repo, voc)
    (repo / "report").mkdir()
    (repo / "report/README.md").write_text("# report\n")
    write_pdf(repo)
    return repo, voc


def write_pdf(repo, miou_shift=0.0):
    row = list(reproduce_row(repo / "outputs/a_eval.json", "a_last.pth"))
    row[1] = f"{float(row[1]) + miou_shift:.2f}"
    return write_contract_pdf(repo / "report/report.pdf", [tuple(row)])


def pack_args(repo, out, *extra):
    return pack.get_args_parser().parse_args(
        ["--student-number", "12345678", "--root", str(repo), "--out-dir", str(out), *extra])


def check_args(voc, zips, *extra):
    return pack.get_args_parser().parse_args(
        ["--check", *map(str, zips), "--data-root", str(voc), "--skip-teacher", *extra])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(repo, voc tree, the zip pack.py made of it)."""
    base = tmp_path_factory.mktemp("pack")
    repo, voc = make_lab(base)
    return repo, voc, pack.main(pack_args(repo, base / "zips"))


def names_in(zip_path):
    with zipfile.ZipFile(zip_path) as zf:
        return set(zf.namelist())


def test_the_zip_holds_what_test_txt_needs_and_nothing_else(lab, capsys):
    repo, _, zip_path = lab
    names = names_in(zip_path)
    assert zip_path.name == "12345678.zip"
    for needed in ("evaluate.py", "pack.py", "train.txt", "test.txt", "requirements.txt",
                   "models/a_last.pth", "plots/a_curves.png", "outputs/a_eval.json",
                   "report/report.pdf", "report/README.md", "MANIFEST.json"):
        assert needed in names, needed
    assert any(n.startswith("outputs/a_last_overlays/") for n in names)  # the overlays
    assert not [n for n in names if n.startswith(("data/", ".venv/", "models/other"))
                or "__pycache__" in n]
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read("MANIFEST.json"))
        assert set(manifest["files"]) == names - {"MANIFEST.json"}
        for name, entry in manifest["files"].items():
            data = zf.read(name)
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == pack.hashlib.sha256(data).hexdigest()
    assert manifest["students"] == ["12345678"]
    assert manifest["checkpoints"]["models/a_last.pth"]["params"] == \
        json.loads((repo / "outputs/a_eval.json").read_text())["params"]


def test_result_files_record_what_shapes_their_number(lab):
    result = json.loads((lab[0] / "outputs/a_eval.json").read_text())
    assert (result["split"], result["limit"], result["num_images"]) == ("val", 3, 3)
    assert result["data_root"] == str(lab[1]) and result["amp"] is False


def test_check_passes_on_the_zip_pack_made_and_leaves_it_untouched(lab, tmp_path):
    repo, voc, zip_path = lab
    before = (zip_path.read_bytes(), zip_path.stat().st_mtime_ns)
    args = check_args(voc, [zip_path], "--json", str(tmp_path / "check.json"))
    [result] = pack.main(args)
    assert result["passed"], result["rows"]
    rows = {r["check"].split(" (")[0]: r for r in result["rows"]}
    assert rows["mIoU a_eval.json"]["ok"] == "yes"  # compared, not skipped
    assert rows["parameters a_eval.json"]["ok"] == "yes"
    assert rows["rerun teacher_eval.json"]["ok"] == "skip"
    assert "limit 3 (from the result file)" in rows["rerun a_eval.json"]["got"]
    assert json.loads((tmp_path / "check.json").read_text())["submissions"][0]["passed"]
    assert (zip_path.read_bytes(), zip_path.stat().st_mtime_ns) == before


def test_a_quick_check_says_it_compares_no_mIoU(lab, tmp_path, capsys):
    _, voc, zip_path = lab
    [result] = pack.main(check_args(voc, [zip_path], "--limit", "2",
                                    "--json", str(tmp_path / "c.json")))
    miou = next(r for r in result["rows"] if r["check"].startswith("mIoU "))
    assert miou["ok"] == "skip" and "not compared" in miou["got"]
    assert "quick check" in capsys.readouterr().out


def rezip(src, dst, drop=(), replace=None):
    """A copy of the zip ``src`` made by hand: without ``drop``, with {name: bytes} replaced."""
    replace = replace or {}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in drop:
                zout.writestr(name, replace.get(name, zin.read(name)))
    return dst


@pytest.mark.slow
def test_broken_zips_each_fail_naming_the_file_or_run(lab, tmp_path):
    """Three broken submissions and a good one, checked at once into one sheet."""
    repo, voc, good = lab
    other = (repo / "models/other_last.pth").read_bytes()
    swapped = rezip(good, tmp_path / "swapped" / "12345678.zip",
                    replace={"models/a_last.pth": other})
    missing = rezip(good, tmp_path / "missing" / "12345678.zip", drop={"models/a_last.pth"})
    # a report edited to claim 5 points more, then packed by pack.py (a consistent manifest)
    edited_repo = tmp_path / "edited"
    shutil.copytree(repo, edited_repo)
    write_pdf(edited_repo, miou_shift=5.0)
    edited = pack.main(pack_args(edited_repo, tmp_path / "edited_zip"))
    sheet = tmp_path / "grades.csv"
    proc = subprocess.run([sys.executable, str(REPO / "pack.py"), "--check", str(good),
                           str(swapped), str(missing), str(edited), "--data-root", str(voc),
                           "--skip-teacher", "--json", str(tmp_path / "all.json"),
                           "--sheet", str(sheet)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    good_r, swapped_r, missing_r, edited_r = json.loads((tmp_path / "all.json").read_text())["submissions"]
    failed = lambda r: {x["check"] for x in r["rows"] if x["ok"] == "NO"}
    assert good_r["passed"] and not failed(good_r)
    assert failed(swapped_r) == {"checkpoint models/a_last.pth (test.txt line 3) sha256",
                                 "mIoU a_eval.json (test.txt line 3)"}
    assert failed(missing_r) == {"checkpoint models/a_last.pth (test.txt line 3)",
                                 "rerun a_eval.json (test.txt line 3)"}
    assert failed(edited_r) == {"mIoU a_eval.json (test.txt line 3)"}
    rows = list(csv_rows(sheet))
    assert [r["passed"] for r in rows] == ["yes", "no", "no", "no"]
    assert all(r["teacher_skipped"] == "yes" for r in rows)
    assert "mIoU a_eval.json" in rows[3]["failed_checks"]


def csv_rows(path):
    import csv
    return csv.DictReader(io.StringIO(path.read_text()))


# --------------------------------------------------------------------------- refusals

def refusal(args):
    with pytest.raises(pack.UserError) as info:
        pack.main(args)
    return str(info.value)


def test_pack_refuses_a_number_that_is_not_digits_and_warns_on_other_lengths(lab, tmp_path, capsys):
    repo = lab[0]
    args = pack_args(repo, tmp_path)
    args.student_number = "1234567a"
    assert "not all digits" in refusal(args)
    args.student_number, args.partner = "1234567", "87654321"
    assert pack.main(args).name == "1234567_87654321.zip"
    assert "1234567 has 7 digits" in capsys.readouterr().out


def test_pack_refuses_a_missing_checkpoint_a_stale_pdf_a_big_zip_and_an_old_zip(lab, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(lab[0], repo)
    out = tmp_path / "zips"
    (out / "12345678.zip").parent.mkdir()
    (out / "12345678.zip").write_bytes(b"someone else's")
    assert "--force" in refusal(pack_args(repo, out))
    assert (out / "12345678.zip").read_bytes() == b"someone else's"
    assert "over --max-mb 0.5" in refusal(pack_args(repo, out, "--force", "--max-mb", "0.5"))
    assert (out / "12345678.zip").read_bytes() == b"someone else's"  # the refusal left it
    assert not list(out.glob(".*.tmp"))
    pdf_time = (repo / "report/report.pdf").stat().st_mtime
    os.utime(repo / "outputs/a_eval.json", (pdf_time + 10, pdf_time + 10))
    assert "older than outputs/a_eval.json" in refusal(pack_args(repo, out, "--force"))
    (repo / "report/report.pdf").unlink()
    assert "report.pdf is missing" in refusal(pack_args(repo, out, "--force"))
    write_pdf(repo)
    (repo / "models/a_last.pth").unlink()
    message = refusal(pack_args(repo, out, "--force"))
    assert "test.txt line 3 names models/a_last.pth" in message


def test_check_reads_page_count_and_headings_from_the_pdf(tmp_path):
    row = ("a_eval.json", "41.20", "1,298,981", "a_last.pth", "val", "3")
    pdf = write_contract_pdf(tmp_path / "report/report.pdf", [row], pages=7,
                             headings=pack.HEADINGS[:5] + ("6. LLMs",))
    rows, text = pack.check_pdf(tmp_path)
    assert [r["ok"] for r in rows] == ["NO", "NO"]
    assert "6. LLM use" in rows[1]["got"] and rows[0]["got"] == "7"
    assert pack.claimed(text, "a_eval.json") == (41.20, 1_298_981)
    assert pack.claimed(text, "eval.json") == (None, None)  # a basename, not a suffix
    assert pdf.is_file()


def test_a_git_checkout_packs_its_tracked_files_only(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    git = lambda *argv: subprocess.run(["git", *argv], cwd=tmp_path, check=True,
                                       capture_output=True)
    git("init", "-q")
    (tmp_path / "kept.py").write_text("tracked")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/also.txt").write_text("tracked")
    (tmp_path / "scratch.py").write_text("untracked")
    git("add", "kept.py", "sub/also.txt")
    assert sorted(pack.tracked_files(tmp_path)) == ["kept.py", "sub/also.txt"]
    shutil.rmtree(tmp_path / ".git")  # the walk, without git
    assert sorted(pack.tracked_files(tmp_path)) == ["kept.py", "scratch.py", "sub/also.txt"]
