"""architecture.block_table against the model itself, and the typst formulas of losses.TERMS.

The rows must be disjoint modules that hold every parameter (compared by parameter
identity, not by totals), their sizes must be what forward hooks written here measure,
and every formula must compile in typst.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import architecture  # noqa: E402
import losses  # noqa: E402
import report  # noqa: E402
from cli import UserError  # noqa: E402
from student_model import CompactStudentModel  # noqa: E402

SIZES = [(65, 47), (96, 128)]  # odd and even, non-square: strides round differently


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs on a shared machine: threads only wait
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def students():
    torch.manual_seed(0)
    return {v: CompactStudentModel(v, pretrained_backbone=False).eval() for v in ("lite", "lab")}


def hooked_outputs(model, size):
    """{module path: (in channels, out channels, (h, w))} of every module that runs, from the
    first call of each, measured by hooks on all named modules (independent of the table)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        def record(mod, inputs, output, name=name):
            if name not in seen and torch.is_tensor(output):
                seen[name] = (inputs[0].shape[1], output.shape[1], tuple(output.shape[2:]))
        handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(torch.randn(1, 3, *size))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("variant", ["lite", "lab"])
def test_rows_are_disjoint_and_cover_every_parameter(students, variant):
    model = students[variant]
    blocks = architecture.block_table(model, SIZES[0])
    owner = {}
    for block in blocks:
        params = list(model.get_submodule(block.name).parameters())
        assert block.params == sum(p.numel() for p in params), block.name
        for p in params:
            assert id(p) not in owner, f"{block.name} shares a parameter with {owner.get(id(p))}"
            owner[id(p)] = block.name
    assert set(owner) == {id(p) for p in model.parameters()}
    assert sum(b.params for b in blocks) == sum(p.numel() for p in model.parameters())
    assert {b.part for b in blocks} >= {"encoder", "aspp", "decoder", "head"}


@pytest.mark.parametrize("variant", ["lite", "lab"])
@pytest.mark.parametrize("size", SIZES)
def test_sizes_and_channels_are_those_hooks_measure(students, variant, size):
    model = students[variant]
    measured = hooked_outputs(model, size)
    blocks = architecture.block_table(model, size)
    for block in blocks:
        c_in, c_out, out_size = measured[block.name]
        assert (block.c_in, block.c_out, block.out_size) == (c_in, c_out, out_size), block.name
    # the stated input reaches the table: the encoder's first stage halves it (rounding up)
    assert blocks[0].out_size == tuple((s + 1) // 2 for s in size)


def test_sizes_follow_the_input(students):
    small, large = (architecture.block_table(students["lite"], s) for s in SIZES)
    changed = [a.name for a, b in zip(small, large) if a.out_size != b.out_size]
    assert len(changed) >= len(small) - 1  # all but the 1x1 image-pooling branch


def test_aspp_rates_and_strides_read_from_the_convs(students):
    for variant, model in students.items():
        rows = {b.name: b for b in architecture.block_table(model, SIZES[1])}
        rates = [rows[f"aspp.branches.{i}"].dilation for i in range(4)]
        assert rates == [1, 6, 12, 18], variant
        for i in range(1, 4):
            assert rows[f"aspp.branches.{i}"].kernel == 3
        # output stride 16 at the 'high' tap; the dilated stages 9-11 have stride 1
        assert [rows[f"backbone.{i}"].stride for i in (9, 10, 11)] == [1, 1, 1]
        assert [rows[f"backbone.{i}"].dilation for i in (9, 10, 11)] == [2, 2, 2]
        assert "tap 'high'" in rows["backbone.12"].operator


def test_measuring_leaves_the_model_as_it_was():
    torch.manual_seed(1)
    model = CompactStudentModel("lite", pretrained_backbone=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    architecture.block_table(model, SIZES[0])
    assert model.training  # and the BatchNorm statistics did not move (measured in eval)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapters_rows_have_no_size_and_count_their_parameters(students):
    model, adapters = students["lite"], architecture.build_adapters()
    blocks = architecture.block_table(model, SIZES[0], adapters)
    rows = [b for b in blocks if b.part == "adapters"]
    assert [b.name for b in rows] == [f"adapters.{t}" for t in ("low", "mid", "high")]
    assert all(b.out_size is None for b in rows)
    assert sum(b.params for b in rows) == sum(p.numel() for p in adapters.parameters())
    assert [(b.c_in, b.c_out) for b in rows] == [(24, 256), (40, 512), (576, 2048)]


def test_markdown_rows(students):
    blocks = architecture.block_table(students["lab"], SIZES[0])
    header, rows = architecture.markdown_rows(blocks)
    assert len(rows) == len(blocks) and all(len(r) == len(header) for r in rows)
    column = {name: i for i, name in enumerate(header)}
    assert sum(int(r[column["parameters"]].replace(",", "")) for r in rows) == sum(
        b.params for b in blocks)
    first = rows[0]
    assert first[column["channels"]] == f"{blocks[0].c_in} → {blocks[0].c_out}"
    assert first[column["output size"]] == "×".join(map(str, blocks[0].out_size))


def test_cli_prints_the_table_and_the_total(capsys):
    args = architecture.get_args_parser().parse_args(["--student", "lite", "--size", "64", "48"])
    architecture.main(args)
    out = capsys.readouterr().out
    total = sum(p.numel() for p in architecture.build_student("lite").parameters())
    assert f"{total:,} inference parameters" in out and "| aspp.branches.3 |" in out
    with pytest.raises(UserError):
        architecture.main(architecture.get_args_parser().parse_args(["--size", "1", "2", "3"]))
    with pytest.raises(UserError):
        architecture.build_student("huge")


# ------------------------------------------------------------------ formulas

def compile_math(math):
    typst = pytest.importorskip("typst")
    typst.compile(f"$ {math} $".encode())


def test_typst_rejects_broken_math():
    # guards the guard: the mistakes a formula can hold must raise, or the tests below are
    # void: a multi-letter name outside quotes (KL instead of "KL") and an unclosed string
    for broken in ("tau^2 KL(p || q)", 'x_"CE'):
        with pytest.raises(Exception, match="unknown variable|unclosed"):
            compile_math(broken)


@pytest.mark.parametrize("name", list(losses.TERMS))
def test_every_term_formula_compiles_and_cites_a_paper(name):
    term = losses.TERMS[name]
    assert term.label and term.formula and term.symbol
    assert term.paper in architecture.CITATIONS
    compile_math(f"{term.symbol} = {term.formula}")


def test_ce_and_total_formulas_compile():
    compile_math(f"{losses.CE_SYMBOL} = {losses.CE_FORMULA}")
    compile_math(report.total_formula({name: 0.5 for name in losses.TERMS}))
    compile_math(report.total_formula({"kd": 0.5, "at": 1e-5}))
    assert {"mobilenetv3", "deeplab_aspp", "hinton"} <= set(architecture.CITATIONS)


def test_total_formula_omits_zero_weights():
    text = report.total_formula({"kd": 0.5, "feat": 0.0, "at": 2.0})
    symbols = {name: term.symbol for name, term in losses.TERMS.items()}
    assert symbols["kd"] in text and symbols["at"] in text and losses.CE_SYMBOL in text
    assert all(symbols[n] not in text for n in ("feat", "pixel", "pair", "cwd"))
    assert "0.5 dot " + losses.CE_SYMBOL in text and "2 dot " + symbols["at"] in text
    # alpha = 1: CE gets weight 0 and drops out; an explicit 'ce' weight is used as given
    assert losses.CE_SYMBOL not in report.total_formula({"kd": 1.0})
    assert report.total_formula({"ce": 0.25, "kd": 0.0}) == f"cal(L) = 0.25 dot {losses.CE_SYMBOL}"
    assert "e-" not in report.total_formula({"at": 1e-5})  # Python's 1e-05 is no typst number
    with pytest.raises(KeyError):
        report.total_formula({"nonsense": 1.0})
