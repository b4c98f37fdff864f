"""What every entry script shares at its edges: the error a user can fix, its one-line
message, the --help formatter, range-checked flag types (``ranged``, ``Option``), ``run_cli``, and the two things
scripts print about themselves (a Markdown table, the git revision)."""
import argparse
import math
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, broken input).

    Entry scripts print its message as one line and exit with status 2, without a
    traceback: the message itself names the cause and the fix.
    """




def one_line(exc, limit=None):
    """The message of ``exc`` as one line, cut to ``limit`` characters when given.

    A ``UserError`` raised inside a DataLoader worker comes back wrapped in a message
    holding the worker's traceback; its last line is ``module.UserError: <message>``.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())[:limit]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the docstring's layout and names every flag's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


def ranged(kind=float, low=-math.inf, high=math.inf, open_low=False):
    """An argparse ``type=`` that also checks the range: ``low`` <= x (< x when ``open_low``)
    <= ``high``, x finite. Every range is checked there, once, as the flag is parsed."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if open_low else value >= low)
                and value <= high):
            bounds = ("> " if open_low else ">= ") + f"{low:g}" if high == math.inf \
                else f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a number {bounds}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid float value" names it
    return parse


def run_cli(main, parser):
    """Parse the arguments, run ``main(args)``, turn a ``UserError`` into a one-line exit."""
    args = parser.parse_args()
    try:
        main(args)
    except KeyboardInterrupt:  # Ctrl-C outside the part of a run that saves a checkpoint
        print("error: interrupted (Ctrl-C); nothing was saved by this step", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:
        # A UserError raised in a DataLoader worker is re-raised here as a RuntimeError
        # when its class cannot be rebuilt from the wrapped message.
        if "UserError" in str(exc):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        raise

def markdown_table(header, rows):
    """A Markdown table: ``header`` names the columns, each row is a list of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class Option:
    """A command-line number declared as data (losses.TERMS): flag names, default, help,
    and its valid range, checked by the parser (``parse``, a ``ranged`` type): ``low`` <=
    value (< when ``open_low``) <= ``high``."""
    flags: tuple
    default: float
    help: str
    low: float = 0.0
    high: float = math.inf
    open_low: bool = False

    @property
    def dest(self):
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def parse(self):
        return ranged(float, self.low, self.high, self.open_low)
