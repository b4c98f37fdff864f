"""A stand-in for report.py's PDF, written as the contract between report.py and pack.py
states it: the six literal headings and the 'Reproduce with test.txt' table, on ``pages``
pages, rendered with the typst package (the report's own renderer)."""
import json
from pathlib import Path

HEADINGS = ("1. Architecture", "2. Knowledge distillation", "3. Hyperparameters and training",
            "4. Experiments", "5. Discussion", "6. LLM use")


def reproduce_row(result_path, checkpoint="torchvision default"):
    """The table's row for one result file, from the file itself (the true numbers)."""
    result = json.loads(Path(result_path).read_text())
    limit = result.get("limit")
    return (Path(result_path).name, f"{100 * result['miou']:.2f}", f"{result['params']:,}",
            checkpoint, result.get("split", "val"), "none" if limit is None else str(limit))


def cell(text):
    return "[#" + json.dumps(str(text)) + "]"  # a typst string: no markup inside


def write_contract_pdf(path, rows, pages=4, headings=HEADINGS):
    """Write the PDF at ``path``; ``rows`` are the table's rows (tuples of six strings)."""
    import typst
    header = ("result file", "mIoU (%)", "parameters", "checkpoint", "split", "limit")
    table = ", ".join(cell(c) for r in [header, *rows] for c in r)
    parts = ["#set heading(numbering: none)", "#set page(paper: \"a4\")", "#align(center)[ELEC 475 Lab 3]"]
    for i, heading in enumerate(headings):
        parts.append(f"= {heading}\nText of the section.")
        if heading.startswith("4."):
            parts.append(f"#figure(table(columns: 6, {table}), caption: [Reproduce with test.txt])")
        if len(headings) - pages <= i < len(headings) - 1:
            parts.append("#pagebreak()")
    parts += ["#pagebreak()\nMore text."] * (pages - len(headings))
    source = Path(path).with_suffix(".typ")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    typst.compile(str(source), output=str(path))
    source.unlink()
    return Path(path)
