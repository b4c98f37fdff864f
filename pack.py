"""The lab's submission: pack <student number>.zip, and check that a zip reproduces its report.

Packing takes the code (the tracked files), train.txt, test.txt, the requirements, the
checkpoints test.txt names, plots/, the result files and overlays in outputs/, and report/
(PDF and folder), with a MANIFEST.json of every file's sha256. Checking unpacks a zip into a
temporary folder, checks its name, files, PDF and checkpoints, reruns every evaluation line
of test.txt with the unpacked code, and compares each mIoU with the number the PDF claims.

    python pack.py --student-number 12345678
    python pack.py --student-number 12345678 --partner 23456789 --out-dir ..
    python pack.py --check 12345678.zip --data-root ./data
    python pack.py --check 12345678.zip --data-root ./data --limit 20 --skip-teacher
    python pack.py --check 111.zip 222_333.zip --data-root ./data --sheet grades.csv

A full check on a CPU costs about 45 minutes for the teacher on VOC val and a few minutes per
student; --skip-teacher and --limit make it minutes (docs/submission.md).
"""
import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import typeset
from cli import (REPO_DIR, HelpFormatter, UserError, git_revision, ranged,
                 run_cli)
from files import save_json

PDF = "report/report.pdf"
MANIFEST = "MANIFEST.json"
HEADINGS = ("1. Architecture", "2. Knowledge distillation", "3. Hyperparameters and training",
            "4. Experiments", "5. Discussion", "6. LLM use")
PAGES = (4, 6)  # the lab's page limits
EVAL_SCRIPTS = ("test_teacher.py", "evaluate.py")
CHECKPOINT_FLAGS = ("--model_path", "--model-path", "--weights", "--teacher-weights")
NOT_FILES = ("default", "none")  # --weights values that name torchvision's, not a file
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
# never packed: data, environments, caches, generated demo trees, weights nobody names
SKIP_DIRS = {"data", ".venv", "venv", "env", ".git", "__pycache__", ".pytest_cache",
             ".mypy_cache", ".ipynb_checkpoints", ".idea", ".vscode", "node_modules"}
SKIP_TOP = {"models"}  # only the checkpoints test.txt names go in
SKIP_SUFFIXES = (".pyc", ".zip", ".onnx", ".pt2", *CHECKPOINT_SUFFIXES)
REQUIRED = ("train.txt", "test.txt", "requirements.txt", "evaluate.py", "test_teacher.py",
            PDF, "report/README.md")
ZIP_NAME = re.compile(r"\d+(_\d+)?")
MIOU = re.compile(r"(?<![\d.])(\d{1,3}\.\d{2})(?![\d])")
PARAMS = re.compile(r"(?<![\d,])(\d{1,3}(?:,\d{3})+)(?![\d])")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # packing
    parser.add_argument("--student-number", default=None,
                        help="your student number, all digits (Queen's numbers have 8); "
                             "the zip is named after it")
    parser.add_argument("--partner", default=None,
                        help="a partner's student number: the zip becomes N_M.zip")
    parser.add_argument("--root", default=str(REPO_DIR),
                        help="the repository to pack (default: the one holding pack.py)")
    parser.add_argument("--out-dir", default=".", help="where the zip is written")
    parser.add_argument("--max-mb", type=ranged(float, 0, open_low=True), default=500.0,
                        help="refuse a zip larger than this many MB: an upload limit a course "
                             "site will take; the lab's zip (code, five ~5-15 MB "
                             "checkpoints, plots, PDF) is far below it")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing zip of the same name")
    # checking
    parser.add_argument("--check", nargs="+", default=None, metavar="ZIP",
                        help="check these zips instead of packing")
    parser.add_argument("--data-root", default="./data",
                        help="VOC for the reruns (VOCdevkit/VOC2012 under it), resolved "
                             "against the current folder")
    parser.add_argument("--limit", type=ranged(int, 1), default=None,
                        help="quick check: score the first N images instead of the number each "
                             "result file recorded; mIoU is then not compared (said so)")
    parser.add_argument("--skip-teacher", action="store_true",
                        help="do not rerun test_teacher.py lines (torchvision's network; about "
                             "45 min on a CPU for VOC val); the sheet says so")
    parser.add_argument("--tolerance", type=ranged(float, 0), default=0.1,
                        help="allowed |rerun - claimed| mIoU, in points (docs/submission.md: "
                             "same device, same predictions; GPU vs CPU flips few pixels)")
    parser.add_argument("--json", default="pack_check.json", help="where the check's results go")
    parser.add_argument("--sheet", default=None,
                        help="grading sheet CSV, one row per zip (default: none)")
    parser.add_argument("--timeout", type=ranged(float, 1), default=7200.0,
                        help="seconds one rerun may take before it counts as failed")
    return parser


# --------------------------------------------------------------------------- test.txt

def lab_lines(text):
    """(line number, argv without 'python') of each command line of test.txt."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("python "):
            out.append((number, shlex.split(line.strip())[1:]))
    return out


def flag_values(argv):
    """(flag, value) pairs of ``argv``: '--f v' and '--f=v' alike."""
    pairs = []
    for i, token in enumerate(argv):
        if token.startswith("--") and "=" in token:
            pairs.append(tuple(token.split("=", 1)))
        elif token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((token, argv[i + 1]))
    return pairs


def named_checkpoints(argv):
    """The checkpoint paths a line names: a weights flag's value that is not 'default' or
    'none', or any flag's value with a checkpoint suffix."""
    return [value for flag, value in flag_values(argv)
            if (flag in CHECKPOINT_FLAGS and value not in NOT_FILES)
            or value.endswith(CHECKPOINT_SUFFIXES)]


def result_file(argv):
    """Where an evaluation line writes its results (its --json, else the script's default)."""
    values = dict(flag_values(argv))
    if values.get("--json"):
        return values["--json"]
    if argv[0] == "test_teacher.py":
        return "outputs/teacher_eval.json"
    checkpoint = values.get("--model_path") or values.get("--model-path") or "model.pth"
    return str(Path(values.get("--output-dir", "outputs")) / f"{Path(checkpoint).stem}_eval.json")


def evaluations(root):
    """[(line number, argv, result path)] of test.txt's test_teacher.py/evaluate.py lines."""
    text = (Path(root) / "test.txt").read_text(encoding="utf-8")
    return [(n, argv, result_file(argv)) for n, argv in lab_lines(text) if argv[0] in EVAL_SCRIPTS]


def rel(path):
    """A path as the zip and the manifest spell it: relative, with '/'."""
    return PurePosixPath(Path(os.path.normpath(path)).as_posix()).as_posix()


# --------------------------------------------------------------------------- packing

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def skipped(name):
    parts = PurePosixPath(name).parts
    return (bool(SKIP_DIRS.intersection(parts[:-1])) or parts[0] in SKIP_TOP
            or name.endswith(SKIP_SUFFIXES))


def tracked_files(root):
    """`git ls-files` when ``root`` is a git checkout, else every file of a walk."""
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                                 timeout=60, check=True).stdout.decode("utf-8")
            return [n for n in out.split("\0") if n and (root / n).is_file()]
        except (OSError, subprocess.SubprocessError):
            pass  # no git on this machine: the walk below
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names += [rel(Path(folder, f).relative_to(root)) for f in files]
    return names


def generated_files(root):
    """plots/, report/ and outputs/ (result files, overlays): made by commands, not tracked."""
    names = []
    for top in ("plots", "report", "outputs"):
        names += [rel(p.relative_to(root)) for p in (root / top).rglob("*") if p.is_file()]
    return names


def checkpoint_lines(root):
    """{checkpoint path: [test.txt line numbers naming it]}, in order of appearance."""
    found = {}
    for number, argv in lab_lines((root / "test.txt").read_text(encoding="utf-8")):
        for path in named_checkpoints(argv):
            found.setdefault(rel(path), []).append(number)
    return found


def select_files(root):
    """(files to pack, checkpoints test.txt names): both relative posix paths, sorted."""
    for name in ("test.txt", PDF):
        if not (root / name).is_file():
            fix = "run python report.py" if name == PDF else "write the lab's test.txt"
            raise UserError(f"{root / name} is missing: {fix}, then pack again")
    checkpoints = checkpoint_lines(root)
    for path, numbers in checkpoints.items():
        if not (root / path).is_file():
            raise UserError(f"test.txt line {numbers[0]} names {path}, which does not exist: "
                            "train that run (train.txt) or fix the line, then pack again")
    names = {n for n in tracked_files(root) + generated_files(root) if not skipped(n)}
    names.update(n for n in ("train.txt", "test.txt") if (root / n).is_file())
    names.update(rel(p.name) for p in root.glob("requirements*.txt"))
    names.update(checkpoints)
    names.discard(MANIFEST)
    return sorted(names), checkpoints


def refuse_stale_pdf(root):
    """The PDF must be newer than every result file of test.txt's evaluations."""
    pdf_time = (root / PDF).stat().st_mtime
    for number, _, result in evaluations(root):
        path = root / result
        if not path.is_file():
            print(f"warning: test.txt line {number} writes {result}, which does not exist; "
                  "pack.py --check will rerun it but the report cannot claim it")
        elif path.stat().st_mtime > pdf_time:
            raise UserError(f"{PDF} is older than {result}: run python report.py so the "
                            "report shows the latest results, then pack again")


def checkpoint_params(path, scripts):
    """Parameters of the model a checkpoint holds, as the scripts that read it count them."""
    from compute import count_params
    from nets import load_model, model_from_checkpoint
    try:
        model, _ = model_from_checkpoint(path)
    except UserError:
        if "test_teacher.py" not in scripts:
            return None
        model = load_model(scripts["test_teacher.py"], str(path))  # a bare teacher state dict
    return count_params(model)


def manifest_of(root, names, checkpoints, students):
    scripts = {}
    for _, argv in lab_lines((root / "test.txt").read_text(encoding="utf-8")):
        arch = dict(flag_values(argv)).get("--arch", "fcn_resnet50")
        for path in named_checkpoints(argv):
            scripts.setdefault(rel(path), {})[argv[0]] = arch
    files = {n: {"sha256": sha256(root / n), "bytes": (root / n).stat().st_size} for n in names}
    ckpts = {p: {**files[p], "params": checkpoint_params(root / p, scripts[p]),
                 "test_txt_lines": lines} for p, lines in checkpoints.items()}
    return {"students": students, "zip": "_".join(students) + ".zip",
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_revision() if root == REPO_DIR else None,
            "checkpoints": ckpts, "files": files}


def student_numbers(args):
    numbers = [args.student_number] + ([args.partner] if args.partner else [])
    for n in numbers:
        if not n or not n.isdigit() or not n.isascii():
            raise UserError(f"student number {n!r} is not all digits: pass --student-number "
                            "with your number as digits only (Queen's numbers have 8)")
        if len(n) != 8:
            print(f"warning: student number {n} has {len(n)} digits; Queen's numbers have 8")
    return numbers


def write_zip(root, names, manifest, path, max_mb):
    """The zip, written beside ``path`` then renamed; refused (and removed) over ``max_mb``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in names:
                zf.write(root / name, name)
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        size = tmp.stat().st_size
        if size > max_mb * 1e6:
            raise UserError(f"{path.name} would be {size / 1e6:.1f} MB, over --max-mb "
                            f"{max_mb:g}: remove files nobody needs from plots/ or outputs/, "
                            "or raise --max-mb if your course site takes more")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return size


def summary_rows(root, names, checkpoints):
    """What went in, by top folder, with the checkpoints one by one."""
    groups = {}
    for name in names:
        top = name.split("/", 1)[0] if "/" in name else "(top level)"
        count, size = groups.get(top, (0, 0))
        groups[top] = (count + 1, size + (root / name).stat().st_size)
    rows = [(top, str(c), f"{s / 1e6:.2f} MB") for top, (c, s) in sorted(groups.items())]
    rows += [(f"  checkpoint {p}", "1", f"{(root / p).stat().st_size / 1e6:.2f} MB")
             for p in checkpoints]
    return rows


def pack(args):
    students = student_numbers(args)
    root = Path(args.root).resolve()
    out = Path(args.out_dir) / ("_".join(students) + ".zip")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists and pack.py did not just make it: move it away, or pass "
                        "--force to replace it")
    names, checkpoints = select_files(root)
    refuse_stale_pdf(root)
    manifest = manifest_of(root, names, checkpoints, students)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = write_zip(root, names, manifest, out, args.max_mb)
    for row in summary_rows(root, names, checkpoints):
        print(f"{row[0]:<48} {row[1]:>6} files {row[2]:>12}")
    print(f"wrote {out} ({size / 1e6:.1f} MB, {len(names) + 1} files, limit {args.max_mb:g} MB); "
          f"check it with: python pack.py --check {out} --data-root ./data")
    return out


# --------------------------------------------------------------------------- checking

def row(check, expected, got, ok):
    """One line of the check's table; ``ok`` is True, False or None (skipped, said why)."""
    return {"check": check, "expected": str(expected), "got": str(got),
            "ok": {True: "yes", False: "NO", None: "skip"}[ok]}


def unpack(zip_path, dest):
    """Extract ``zip_path`` (opened read-only) into ``dest``, refusing paths that leave it."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name in zf.namelist():
                if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                    raise UserError(f"{zip_path}: holds {name!r}, a path outside the zip's "
                                    "folder; repack it with python pack.py")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{zip_path}: not a zip file ({exc}); pass the .zip pack.py wrote") from None
    return dest


def read_manifest(tree):
    try:
        return json.loads((tree / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_name(zip_path, manifest):
    stem = Path(zip_path).name[:-4] if Path(zip_path).name.endswith(".zip") else Path(zip_path).name
    expected = "_".join(manifest["students"]) if manifest else "N.zip or N_M.zip, digits"
    ok = bool(ZIP_NAME.fullmatch(stem)) and (manifest is None or stem == expected)
    return [row("zip name", f"{expected}.zip" if manifest else expected, Path(zip_path).name, ok)]


def check_files(tree, manifest):
    """Required files present; every file's sha256 as the manifest records it."""
    rows = [row("MANIFEST.json", "present", "present" if manifest else "missing", bool(manifest))]
    missing = [n for n in REQUIRED if not (tree / n).is_file()]
    rows.append(row("required files", ", ".join(REQUIRED), "missing: " + ", ".join(missing)
                    if missing else "all present", not missing))
    if (tree / "test.txt").is_file():
        for path, numbers in checkpoint_lines(tree).items():
            rows.append(check_checkpoint(tree, path, numbers, manifest))
    if manifest:
        listed = {**manifest.get("files", {})}
        changed = [n for n, entry in listed.items() if n not in manifest.get("checkpoints", {})
                   and (not (tree / n).is_file() or sha256(tree / n) != entry["sha256"])]
        rows.append(row("other files' sha256", f"{len(listed)} files as MANIFEST.json",
                        "changed or missing: " + ", ".join(changed[:5]) if changed else "all match",
                        not changed))
    return rows


def check_checkpoint(tree, path, numbers, manifest):
    what = f"checkpoint {path} (test.txt line {', '.join(map(str, numbers))})"
    if not (tree / path).is_file():
        return row(what, "present", "missing", False)
    entry = (manifest or {}).get("checkpoints", {}).get(path)
    got = sha256(tree / path)
    if entry is None:
        return row(what + " sha256", "listed in MANIFEST.json", got[:16], False)
    return row(what + " sha256", entry["sha256"][:16], got[:16], got == entry["sha256"])


def pdf_text(path):
    """(page count, the text of all pages with whitespace runs as one space)."""
    pages = typeset.pdf_pages(path)
    return len(pages), " ".join(" ".join(pages).split())


def claimed(text, basename):
    """(mIoU %, parameters) the report claims for a result file (the contract's table): the
    first two-decimal number after the basename, then the next integer with commas."""
    match = re.search(r"(?<![\w.-])" + re.escape(basename) + r"(?![\w.-])", text)
    if not match:
        return None, None
    miou = MIOU.search(text, match.end())
    params = PARAMS.search(text, miou.end()) if miou else None
    return (float(miou.group(1)) if miou else None,
            int(params.group(1).replace(",", "")) if params else None)


def check_pdf(tree):
    """Rows for the page count and the six headings, and the PDF's text (None if unread)."""
    if not (tree / PDF).is_file():
        return [row("report PDF", PDF, "missing", False)], None
    try:
        pages, text = pdf_text(tree / PDF)
    except Exception as exc:  # pypdf raises many kinds on a broken file; all mean the same
        return [row("report PDF", "a readable PDF", f"unreadable ({exc})"[:80], False)], None
    missing = [h for h in HEADINGS if h not in text]
    return [row("PDF pages", f"{PAGES[0]}-{PAGES[1]}", pages, PAGES[0] <= pages <= PAGES[1]),
            row("PDF sections", "the six headings", "missing: " + "; ".join(missing)
                if missing else "all six", not missing)], text


# --------------------------------------------------------------------------- reruns

# flags of a test.txt line that the rerun sets itself: its outputs go to a scratch folder,
# overlays are not redrawn, and data, split and limit are those the result file recorded
RERUN_SETS = {"--json": 1, "--output-dir": 1, "--visualize": 0, "--num_images": 1,
              "--num-images": 1, "--data-root": 1, "--split": 1, "--limit": 1}


def without(argv, flags):
    """``argv`` without ``flags`` ({flag: how many values follow it}), '--f=v' forms too."""
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
        elif token in flags:
            skip = flags[token]
        elif not (token.startswith("--") and token.split("=", 1)[0] in flags):
            out.append(token)
    return out


def rerun_settings(argv, recorded, override):
    """(split, limit, where they came from): the result file's, unless --limit overrides."""
    values, recorded = dict(flag_values(argv)), recorded or {}
    split = recorded.get("split") or values.get("--split") or "val"
    if override:
        return split, override, f"--limit {override} (quick check)"
    if "limit" in recorded:
        return split, recorded["limit"], "the result file"
    if recorded.get("num_images"):  # a result file from before 'limit' was recorded
        return split, recorded["num_images"], "the result file's num_images"
    return split, values.get("--limit"), "the test.txt line (no result file)"


def rerun(tree, argv, recorded, args, scratch):
    """Run one evaluation line from the unpacked tree as its own process; (results, note)."""
    split, limit, source = rerun_settings(argv, recorded, args.limit)
    out_json = scratch / f"{len(list(scratch.glob('*.json')))}_{Path(result_file(argv)).name}"
    cmd = [sys.executable, *without(argv, RERUN_SETS), "--json", str(out_json),
           "--data-root", str(Path(args.data_root).resolve())]
    if argv[0] == "evaluate.py":
        cmd += ["--split", split, "--output-dir", str(scratch)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    note = f"split {split}, limit {limit} (from {source})"
    print(f"  rerunning {' '.join(cmd[1:2] + [shlex.quote(c) for c in cmd[2:]])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout:g} s; {note}"
    if proc.returncode != 0 or not out_json.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return None, f"exit {proc.returncode}: {(errors or lines)[-1][:120]}; {note}"
    return json.loads(out_json.read_text()), note


def run_rows(tree, number, argv, result, manifest, text, args, scratch):
    """The rows of one evaluation line: the rerun, its mIoU and its parameters."""
    name = Path(result).name
    where = f"{name} (test.txt line {number})"
    if argv[0] == "test_teacher.py" and args.skip_teacher:
        return [row(f"rerun {where}", "skipped", "--skip-teacher", None)]
    recorded_path = tree / result
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
    got, note = rerun(tree, argv, recorded, args, scratch)
    if got is None:
        return [row(f"rerun {where}", "exit 0", note, False)]
    rows = [row(f"rerun {where}", "exit 0", f"exit 0, {got.get('num_images')} images, {note}", True)]
    miou, params = claimed(text or "", name)
    rerun_miou = 100 * got["miou"]
    like = (recorded or {}).get("num_images", None if args.limit else got.get("num_images"))
    if miou is None:
        rows.append(row(f"mIoU {where}", "a claim in the report's table", f"{rerun_miou:.2f}", False))
    elif like != got.get("num_images"):
        rows.append(row(f"mIoU {where}", f"{miou:.2f} (report, {like} images)",
                        f"{rerun_miou:.2f} on {got.get('num_images')} images: not compared", None))
    else:
        rows.append(row(f"mIoU {where}", f"{miou:.2f} ± {args.tolerance:g} (report)",
                        f"{rerun_miou:.2f}", abs(rerun_miou - miou) <= args.tolerance + 1e-9))
    rows.append(params_row(where, argv, params, got.get("params"), manifest))
    return rows


def params_row(where, argv, claimed_params, rerun_params, manifest):
    """The report's parameter count against the rerun's and the manifest's."""
    counts = {rerun_params}
    listed = []
    for path in named_checkpoints(argv):
        entry = (manifest or {}).get("checkpoints", {}).get(rel(path))
        if entry and entry.get("params") is not None:
            counts.add(entry["params"])
            listed.append(f"{entry['params']:,} in MANIFEST.json")
    got = ", ".join([f"{rerun_params:,} (rerun)"] + listed)
    expected = f"{claimed_params:,} (report)" if claimed_params else "a count in the report's table"
    return row(f"parameters {where}", expected, got, counts == {claimed_params})


def check_zip(zip_path, args):
    """Every check of one submission: {'zip', 'students', 'passed', 'rows'}."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise UserError(f"{zip_path}: no such file; pass the zip pack.py wrote")
    print(f"checking {zip_path}")
    with tempfile.TemporaryDirectory(prefix="pack_check_") as tmp:
        tree = unpack(zip_path, Path(tmp) / "tree")
        scratch = Path(tmp) / "rerun"
        scratch.mkdir()
        manifest = read_manifest(tree)
        rows = check_name(zip_path, manifest) + check_files(tree, manifest)
        pdf_rows, text = check_pdf(tree)
        rows += pdf_rows
        if (tree / "test.txt").is_file():
            for number, argv, result in evaluations(tree):
                rows += run_rows(tree, number, argv, result, manifest, text, args, scratch)
    students = manifest["students"] if manifest else zip_path.stem.split("_")
    return {"zip": str(zip_path), "students": students,
            "passed": all(r["ok"] != "NO" for r in rows), "rows": rows}


def print_table(result):
    header = ("check", "expected", "got", "ok")
    rows = [header] + [tuple(r[k] for k in header) for r in result["rows"]]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    failed = [r["check"] for r in result["rows"] if r["ok"] == "NO"]
    print(f"{result['zip']}: " + ("PASS" if not failed else f"FAIL ({len(failed)}: "
                                  + "; ".join(failed) + ")"))


def write_sheet(results, path, args):
    """The grading sheet: one row per submission."""
    fields = ("submission", "students", "passed", "failed_checks", "teacher_skipped",
              "limit", "tolerance", "mious")
    def mious(result):
        return "; ".join(f"{r['check'][5:].split(' (')[0]}={r['got'].split(' ')[0]}"
                         for r in result["rows"] if r["check"].startswith("mIoU "))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({"submission": Path(result["zip"]).name,
                         "students": " ".join(result["students"]),
                         "passed": "yes" if result["passed"] else "no",
                         "failed_checks": "; ".join(r["check"] for r in result["rows"]
                                                    if r["ok"] == "NO"),
                         "teacher_skipped": "yes" if args.skip_teacher else "no",
                         "limit": args.limit or "as recorded", "tolerance": args.tolerance,
                         "mious": mious(result)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(buffer.getvalue(), encoding="utf-8")


def check(args):
    if args.limit:
        print(f"quick check: --limit {args.limit} scores the first {args.limit} images of each "
              "line, so an mIoU is compared only where the report scored as many")
    results = []
    for zip_path in args.check:
        results.append(check_zip(zip_path, args))
        print_table(results[-1])
    save_json({"tolerance": args.tolerance, "limit": args.limit, "skip_teacher": args.skip_teacher,
               "data_root": str(Path(args.data_root).resolve()), "submissions": results}, args.json)
    print(f"results written to {args.json}")
    if args.sheet:
        write_sheet(results, args.sheet, args)
        print(f"sheet written to {args.sheet}")
    return results


def main(args):
    """Pack (--student-number) or check (--check); a failed check exits with status 1."""
    if args.check:
        results = check(args)
        if not all(r["passed"] for r in results):
            sys.exit(1)
        return results
    if args.student_number is None:
        raise UserError("nothing to do: pass --student-number N to pack, or --check N.zip "
                        "to check a zip")
    return pack(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
