"""Every model file the project writes, opened as one kind of object: ``load_any(path)``;
and the int8 and ONNX forms written (``quantize_int8``, ``save_int8``, ``export_onnx``).

compress.py writes three formats beside train_kd.py's checkpoints; each opens here as an
``nn.Module`` whose forward takes a normalised float batch and returns the logits (or
torchvision's ``{'out': ...}``), so evaluate.py, benchmark.py and predict.py take any of them
by path:

- ``.pth``: a repo checkpoint (nets.model_from_checkpoint), a channel-pruned one included;
- ``.pt2``: compress.py's PT2E int8 program (torch.export.save), compiled by inductor with
  freezing (``compile_frozen``) on first use: a minute or two on a CPU, then every image
  size reuses it. Needs torchao (requirements-optional.txt);
- ``.onnx``: compress.py's ONNX export, run by onnxruntime's CPU provider.

The .pt2 and .onnx files carry their source checkpoint's record (``model_args``, parameter
count, epoch, source path) as metadata under ``META_KEY``, written by ``export_metadata``; it
comes back as the second value of ``load_any``, shaped like a checkpoint without weights.
Both run on the CPU only (``runs_on``).

    model, record = load_any("models/compressed/no_kd_last_int8.pt2")
"""
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from cli import UserError, one_line
from compute import count_params
from distill import logits_of

META_KEY = "segkd.json"
FORMATS = {".pth": "checkpoint", ".pt": "checkpoint", ".pt2": "int8", ".onnx": "onnx"}
OPTIONAL = {"int8": "torchao", "onnx": "onnxruntime"}


def model_format(path):
    """'checkpoint', 'int8' or 'onnx', from the file's suffix; a UserError for any other."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: not a model file this project writes; pass a checkpoint "
                        "(.pth), an int8 program (.pt2) or an ONNX file (.onnx) from compress.py")
    return fmt


def export_metadata(model, ckpt, source):
    """What a compressed file records of its checkpoint: enough to describe and score it."""
    meta = {k: ckpt[k] for k in ("model_args", "epoch", "class_names", "palette") if k in ckpt}
    return {**meta, "params": count_params(model), "source": str(source)}


def load_any(path):
    """(module returning logits, record): the record is the checkpoint dict for a .pth, the
    file's metadata for a .pt2/.onnx, each with 'format' set."""
    from nets import model_from_checkpoint
    fmt = model_format(path)
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file; pass a model file that compress.py or "
                        "train_kd.py wrote")
    if fmt == "checkpoint":
        model, ckpt = model_from_checkpoint(path)
        return model, {**ckpt, "format": fmt}
    try:
        importlib.import_module(OPTIONAL[fmt])
    except ImportError:
        raise UserError(f"{path}: a {fmt} model needs {OPTIONAL[fmt]}, which is not installed; "
                        "install it with `pip install -r requirements-optional.txt`") from None
    if fmt == "int8":
        meta = {META_KEY: ""}
        program = load_int8(path, meta)
        model = Frozen(compile_frozen(program))
        record = json.loads(meta[META_KEY] or "{}")
    else:
        model = OnnxModel(path, torch.get_num_threads())
        record = model.metadata()
    if "model_args" not in record:
        raise UserError(f"{path}: records no model_args (written before compress.py stored "
                        "them); write it again with compress.py")
    return model, {**record, "format": fmt}


def runs_on(fmt, device):
    """The device a model of format ``fmt`` runs on: compressed programs are built for the CPU."""
    if fmt != "checkpoint" and device.type != "cpu":
        print(f"note: {fmt} models run on the CPU; using it instead of {device}")
        return torch.device("cpu")
    return device


# --------------------------------------------------------------------------- int8 (PT2E)

class Frozen(nn.Module):
    """Wraps an exported/compiled callable so engine.evaluate can call .eval() on it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def train(self, mode=True):
        return self  # exported programs refuse train()/eval(); they are already in eval form

    def forward(self, x):
        return logits_of(self.fn(x))


@torch.library.custom_op("segkd::global_avg_pool", mutates_args=())
def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """adaptive_avg_pool2d(x, 1) as an op inductor calls and does not generate code for."""
    return x.mean((2, 3), keepdim=True).contiguous()


@global_avg_pool.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1], 1, 1)


def opaque_pools(gm):
    """Replace the graph's global average pools (MobileNetV3's squeeze-excite, ASPP's image
    pool) by ``global_avg_pool``, in place.

    Inductor writes such a pool as a float sum over H*W and picks its accumulation by
    whether H*W > 4096 (cpp.py, need_use_acc_helper): a guard on the input size, so every
    image on the other side of one of those thresholds (at strides 4 and 16) compiled the
    whole network again. As an opaque op the pool is aten's kernel and guards nothing.
    """
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.adaptive_avg_pool2d.default and \
                list(node.args[1]) == [1, 1]:
            node.target, node.args = torch.ops.segkd.global_avg_pool.default, node.args[:1]
    gm.graph.lint()
    gm.recompile()
    return gm


def compile_frozen(model):
    """torch.compile with inductor's freezing: constant weights are folded and prepacked,
    which is what selects the int8 (and oneDNN fp32) convolution kernels on x86.

    Compiled once for every image size (tests/test_compress.py counts the compilations):
    the global pools made opaque (``opaque_pools``, for exported graphs), and no duck
    sizing, by which dynamo gives height and width one symbol when the first image is
    square, and compiles again at the first that is not. Inference only: the inputs are
    made inference tensors (a copy of 3*H*W floats where they are not).
    """
    import torch._inductor.config as inductor_config
    from torch.fx.experimental import _config as shape_config
    inductor_config.freezing = True
    inductor_config.cpp_wrapper = True  # the graph's calls made from C++, not Python: ~15% less
    if isinstance(model, torch.fx.GraphModule):
        opaque_pools(model)
    compiled = torch.compile(model, dynamic=True)  # val images come in many sizes

    def run(x):
        # duck sizing is read when a compilation starts; and dynamo guards on whether x is an
        # inference tensor (made under inference mode, as evaluate's are) or not (the sweep's)
        with shape_config.patch(use_duck_shape=False), torch.inference_mode():
            return compiled(x if x.is_inference() else x.clone())
    return run


def dynamic_hw(x):
    """torch.export dynamic-shape spec: any image height and width (VOC sizes vary)."""
    h, w = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
    return {"x": {2: h, 3: w}}


def quantize_int8(model, calib_images):
    """PT2E static int8: export, insert observers, calibrate, convert (torchao's flow).

    torch.ao.quantization's FX mode is deprecated in torch 2.x and cannot trace the student
    (ASPP expands by the traced input shape); PT2E captures it with torch.export. The PT2E
    entry points moved from torch.ao to torchao, hence the import from there.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import (convert_pt2e,
                                                         prepare_pt2e)

    example = calib_images[0]
    exported = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_hw(example))
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for image in calib_images:  # observers record activation ranges
            prepared(image)
    return drop_unused_tensors(convert_pt2e(prepared))


def drop_unused_tensors(gm):
    """Delete the parameters and buffers the converted graph no longer reads.

    convert_pt2e leaves the float weights it replaced by int8 constants attached to the
    module; saved as they are, the int8 file would hold both.
    """
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            parent, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, leaf)
    return gm


def save_int8(qmodel, example, path, metadata=None):
    """The int8 program as torch.export writes it (int8 weights), with ``metadata`` (a dict,
    ``export_metadata``) stored inside the file."""
    program = torch.export.export(qmodel, (example,), dynamic_shapes=dynamic_hw(example))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files={META_KEY: json.dumps(metadata or {})})


def load_int8(path, extra_files=None):
    """The int8 program ``save_int8`` wrote, as a module, in any process; ``extra_files``
    ({META_KEY: ''}) is filled with its metadata. Its quantize and dequantize ops are
    torchao's: importing torchao registers them, and torch.export.load cannot resolve the
    graph without them."""
    importlib.import_module("torchao.quantization.pt2e")  # registers quantized_decomposed ops
    try:
        return torch.export.load(str(path), extra_files=extra_files).module()
    except Exception as exc:  # a truncated or foreign file: torch's own message is a traceback
        raise UserError(f"{path}: cannot be read as an int8 program ({one_line(exc, 120)}); "
                        "write it again with compress.py") from None


# --------------------------------------------------------------------------- ONNX

def export_onnx(model, example, path, metadata=None):
    """One ONNX file, dynamic height and width, ``metadata`` in its metadata_props."""
    import onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), (example,), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_shapes=dynamic_hw(example),
                      external_data=False, dynamo=True)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(metadata or {})})
    onnx.save(proto, str(path))


class OnnxModel(nn.Module):
    """An onnxruntime session behind the nn.Module interface engine.evaluate expects."""

    def __init__(self, path, threads):
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # onnxruntime's idle threads spin-wait by default; in an interleaved timing loop they
        # steal the cores from whichever model runs next (measured: fp32 PyTorch 2x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{path}: onnxruntime cannot open it ({one_line(exc, 120)}); write "
                            "it again with compress.py") from None

    def metadata(self):
        return json.loads(self.session.get_modelmeta().custom_metadata_map.get(META_KEY, "{}"))

    def forward(self, x):
        out = self.session.run(None, {"image": x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)
