"""One document, two renderings: Markdown for GitHub (report/README.md) and typst for the PDF.

A document is a list of blocks (``Heading``, ``Para``, ``Bullets``, ``Table``, ``Figure``,
``Grid``, ``Math``, ``Code``, ``Markdown``). ``to_markdown(blocks)`` and ``to_typst(blocks)``
render it; ``compile_pdf(typ_path, pdf_path)`` runs the ``typst`` package (pip-installable
on Windows, macOS and Linux, offline, its own bundled fonts: no TeX, no system libraries).

Inline text in ``Para``, ``Bullets`` and table cells is a small Markdown subset that both
outputs understand: `code`, **bold**, *italic*, and $typst math$. Everything else is literal
text: it is escaped for typst, so a ``#``, ``_`` or ``<`` in a file name prints as itself.

    python typeset.py report/report.typ report/report.pdf   # recompile an edited report.typ
"""
import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from cli import HelpFormatter, UserError, markdown_table, run_cli

# one inline token: `code`, **bold**, *italic* or $math$ (non-greedy, on one line)
INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\*([^*\s][^*]*?)\*|\$([^$]+)\$")
GREEK = ("alpha", "beta", "gamma", "delta", "lambda", "sigma", "tau", "theta", "mu", "pi")
GREEK_CHARS = dict(zip(GREEK, "αβγδλστθμπ"))


# --------------------------------------------------------------------------- blocks

@dataclass
class Heading:
    text: str
    level: int = 1


@dataclass
class Para:
    text: str
    size: float = None  # font size in pt for the PDF (None: the body's)


@dataclass
class Bullets:
    items: list


@dataclass
class Table:
    header: list
    rows: list
    title: str = ""
    size: float = 8.0  # pt; tables are set smaller than the body to fit the page
    columns: list = None  # typst column widths ('auto', '1fr', '3cm'); None: all auto
    markdown_only: list = field(default_factory=list)  # extra (header, cells) for README only


@dataclass
class Figure:
    path: str  # relative to the report folder
    caption: str = ""
    width: str = "100%"


@dataclass
class Grid:
    """Figures side by side in the PDF (one per line in Markdown)."""
    figures: list
    columns: int = 2
    caption: str = ""


@dataclass
class Math:
    formula: str  # typst math, the text between $ $
    label: str = ""


@dataclass
class Code:
    text: str


@dataclass
class Markdown:
    """Text written by a person in Markdown (students/*.md): copied byte for byte into the
    README, and converted to typst with the same inline subset (paragraphs, - lists, #)."""
    text: str


@dataclass
class Only:
    """A block for one output only: ``target`` 'markdown' (the README's appendix tables, too
    long for the page limit) or 'typst'."""
    block: object
    target: str


# --------------------------------------------------------------------------- inline

def escape_typst(text):
    """Literal text in typst markup: every ASCII punctuation character escaped."""
    return re.sub(r"([\\#$*_`<>@\[\]~/=+\-'\"%&!?|^{}():;.,])", r"\\\1", text)


def typst_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def inline_typst(text):
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(escape_typst(text[pos:m.start()]))
        code, bold, italic, math = m.groups()
        if code is not None:
            out.append(f"#raw({typst_string(code)})")
        elif bold is not None:
            out.append(f"#strong[{inline_typst(bold)}]")
        elif italic is not None:
            out.append(f"#emph[{inline_typst(italic)}]")
        else:
            out.append(f"${math}$")
        pos = m.end()
    return "".join(out) + escape_typst(text[pos:])


def math_markdown(formula):
    """GitHub's $...$ is LaTeX, not typst: a code span with Greek letters is the readable
    fallback (the PDF has the real math)."""
    text = re.sub(r"\b(" + "|".join(GREEK) + r")\b", lambda m: GREEK_CHARS[m.group(1)], formula)
    return "`" + text.replace('"', "") + "`"


def inline_markdown(text):
    return INLINE.sub(lambda m: math_markdown(m.group(4)) if m.group(4) is not None
                      else m.group(0), text)


# --------------------------------------------------------------------------- Markdown

def table_markdown(block):
    header = list(block.header)
    rows = [list(r) for r in block.rows]
    for extra_header, cells in block.markdown_only:
        header.append(extra_header)
        rows = [r + [c] for r, c in zip(rows, cells)]
    body = markdown_table(header, [[inline_markdown(str(c)) for c in r] for r in rows])
    return (f"**{block.title}**\n\n" if block.title else "") + body


def block_markdown(block):
    if isinstance(block, Heading):
        return "#" * (block.level + 1) + " " + block.text  # '#' is the document title
    if isinstance(block, Para):
        return inline_markdown(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {inline_markdown(item)}" for item in block.items)
    if isinstance(block, Table):
        return table_markdown(block)
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.path})" + (f"\n\n*{block.caption}*" if block.caption
                                                      else "")
    if isinstance(block, Grid):
        return "\n".join(block_markdown(f) for f in block.figures) + (
            f"\n\n*{block.caption}*" if block.caption else "")
    if isinstance(block, Math):
        return math_markdown(block.formula) + (f" ({block.label})" if block.label else "")
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Markdown):
        return block.text.rstrip("\n")
    raise TypeError(f"unknown block {block!r}")


def for_target(blocks, target):
    return [b.block if isinstance(b, Only) else b for b in blocks
            if not isinstance(b, Only) or b.target == target]


def to_markdown(blocks, title=""):
    parts = ([title] if title else []) + [block_markdown(b) for b in for_target(blocks, "markdown")]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- typst

PREAMBLE = """// Written by report.py (typeset.py). Edit and recompile with
//   python typeset.py report/report.typ report/report.pdf
// but note that python report.py rewrites this file: the students' own text belongs in students/.
#set page(paper: "a4", margin: (x: 1.6cm, y: 1.5cm), numbering: "1")
#set text(size: 9.5pt)
#set par(justify: true, leading: 0.55em, spacing: 0.8em)
#set heading(numbering: none)
#show heading.where(level: 1): set text(size: 12pt)
#show heading.where(level: 2): set text(size: 10pt)
#show figure: set block(above: 0.6em, below: 0.6em)
#show figure.caption: set text(size: 8pt)
#show raw: set text(font: "DejaVu Sans Mono", size: 0.9em)
"""


def table_typst(block):
    columns = block.columns or ["auto"] * len(block.header)
    cells = [f"[*{inline_typst(str(h))}*]" for h in block.header]
    cells += [f"[{inline_typst(str(c))}]" for row in block.rows for c in row]
    title = f"#text(weight: \"bold\")[{inline_typst(block.title)}]\n" if block.title else ""
    breakable = "true" if len(block.rows) > 12 else "false"  # a short table stays whole
    return (f"#block(breakable: {breakable})[{title}#text(size: {block.size}pt)[#table(\n"
            f"  columns: ({', '.join(columns)},),\n  inset: (x: 3pt, y: 2pt),\n"
            f"  stroke: 0.4pt + luma(160),\n  " + ",\n  ".join(cells) + ",\n)]]")


def figure_typst(block):
    caption = f", caption: [{inline_typst(block.caption)}]" if block.caption else ""
    return f"#figure(image({typst_string(block.path)}, width: {block.width}){caption})"


def grid_typst(block):
    # each image with its own caption line under it (the PNG's own title prints too small)
    images = ", ".join(f"[#image({typst_string(f.path)}, width: 100%)"
                       + (f" #align(center)[#text(size: 7pt)[{inline_typst(f.caption)}]]"
                          if f.caption else "") + "]" for f in block.figures)
    caption = f", caption: [{inline_typst(block.caption)}]" if block.caption else ""
    return (f"#figure(grid(columns: {block.columns}, gutter: 4pt, {images}){caption})")


def markdown_typst(text):
    """A person's Markdown (students/*.md) as typst: headings, - lists, paragraphs; HTML
    comments (the templates' prompts) are left out."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.splitlines()
        if all(re.match(r"\s*[-*] ", line) for line in lines):
            out.append("\n".join("- " + inline_typst(re.sub(r"^\s*[-*] ", "", line))
                                 for line in lines))
        elif para.startswith("#"):
            out.append("#strong[" + inline_typst(para.lstrip("#").strip()) + "]")
        else:
            out.append(inline_typst(" ".join(line.strip() for line in lines)))
    return "\n\n".join(out)


def block_typst(block):
    if isinstance(block, Heading):
        return "=" * block.level + " " + escape_typst(block.text)
    if isinstance(block, Para):
        text = inline_typst(block.text)
        return f"#text(size: {block.size}pt)[{text}]" if block.size else text
    if isinstance(block, Bullets):
        return "\n".join(f"- {inline_typst(item)}" for item in block.items)
    if isinstance(block, Table):
        return table_typst(block)
    if isinstance(block, Figure):
        return figure_typst(block)
    if isinstance(block, Grid):
        return grid_typst(block)
    if isinstance(block, Math):
        # the formula centred, its label right-aligned on the same line
        return (f"#grid(columns: (1fr, auto), align: (center + horizon, right + horizon), "
                f"$ {block.formula} $, text(size: 7.5pt)[{inline_typst(block.label)}])")
    if isinstance(block, Code):
        return f"#block(fill: luma(245), inset: 4pt, width: 100%)[#text(size: 7.5pt)[#raw({typst_string(block.text)}, block: true)]]"
    if isinstance(block, Markdown):
        return markdown_typst(block.text)
    raise TypeError(f"unknown block {block!r}")


def to_typst(blocks, title_block=""):
    return (PREAMBLE + title_block + "\n\n".join(block_typst(b) for b in for_target(blocks, "typst"))
            + "\n")


def compile_pdf(typ_path, pdf_path):
    """typst -> PDF with typst's bundled fonts only, so every machine sets the same pages;
    returns the page count (pypdf)."""
    import typst
    from pypdf import PdfReader
    typ_path, pdf_path = Path(typ_path), Path(pdf_path)
    try:
        typst.compile(str(typ_path), output=str(pdf_path), root=str(typ_path.parent),
                      ignore_system_fonts=True)
    except RuntimeError as exc:  # typst reports source errors as one exception
        raise UserError(f"{typ_path}: typst could not compile it ({' '.join(str(exc).split())[:300]}); "
                        "a $formula$ in students/*.md is typst math: fix it there (or a hand "
                        "edit of this file), then rerun python report.py") from None
    return len(PdfReader(str(pdf_path)).pages)


def pdf_pages(pdf_path):
    """Each page's text as pypdf extracts it: what a reader such as pack.py --check sees."""
    from pypdf import PdfReader
    return [page.extract_text() or "" for page in PdfReader(str(pdf_path)).pages]


def pdf_text(pdf_path):
    """The PDF's text, its pages joined by newlines."""
    return "\n".join(pdf_pages(pdf_path))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("typ", help="a typst source, e.g. report/report.typ")
    parser.add_argument("pdf", help="the PDF to write, e.g. report/report.pdf")
    return parser


def main(args):
    if not Path(args.typ).is_file():
        raise UserError(f"{args.typ}: no such file; run python report.py to write it")
    pages = compile_pdf(args.typ, args.pdf)
    print(f"wrote {args.pdf} ({pages} pages)")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
