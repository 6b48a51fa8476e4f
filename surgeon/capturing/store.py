"""The capture cache on disk: a captured graph written once per model *structure*, so that a new process
that wraps the same architecture skips ``torch.export`` (seconds) and builds the graph from a file.

An entry is a JSON file named by a SHA-256 key over everything that decides the traced graph: the model
class and config, the module tree and tensor shapes (``trace._structure_key``), the call signature, the
torch / transformers / Python versions, the source text of every module class in the model and of
surgeon's capture code. A changed model, library or capture pass is a new key, never a stale graph.
Nothing here can run code from the file: ops are looked up by name among ``torch.ops`` and a fixed set
of Python operators, module calls are only surgeon's dropout modules, output structures go through
torch's pytree registry, and tensors other than the model's own are read with safetensors. An entry that
does not parse, names anything else, or does not fit the model is ignored (and rewritten by the next
capture). ``SURGEON_CACHE_DIR=off`` turns the cache off (``surgeon.caches``).
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import json
import math
import operator
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.utils._pytree as pytree
import transformers
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from surgeon.caches import cache_dir
from surgeon.capturing.dropout import AttentionDropout
from surgeon.capturing.guards import NotPortable, guards_as_nodes
from surgeon.graphs import fetch_attr
from surgeon.outputs import atomic_write_bytes

FORMAT = 1
# the Python functions a captured graph may call (symbolic-size arithmetic): nothing that reaches attributes,
# calls its argument or touches the outside world
_SAFE = {operator: "add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert "
                   "getitem lshift rshift matmul",
         math: "ceil floor trunc sqrt log exp", builtins: "min max abs int float bool round",
         torch: "sym_int sym_float sym_max sym_min sym_not sym_sqrt sym_ite _assert"}
_PY_FUNCTIONS = {f"{m.__name__}.{name}": getattr(m, name) for m, names in _SAFE.items() for name in names.split()
                 if hasattr(m, name)}
_PY_NAMES = {id(fn): name for name, fn in _PY_FUNCTIONS.items()}
_CAPTURE_SOURCES = [Path(__file__).parent / f for f in ("trace.py", "dropout.py", "inputs.py", "decoder.py", "guards.py", "store.py")]


class NotStorable(Exception):
    """The graph holds something this format does not write: it is simply not cached."""


def disk_key(structure: tuple) -> str | None:
    """The entry name for a structure key (from ``trace._structure_key``); None when a module class has no source
    file surgeon can read (defined in a notebook or by ``exec``): such a model is not cached on disk."""
    classes = {structure[0], *(t for _, t, _ in structure[4])}
    try:
        sources = sorted(_source_hash(c) for c in classes)
    except (TypeError, OSError):
        return None
    sources += [hashlib.sha256(p.read_bytes()).hexdigest() for p in _CAPTURE_SOURCES]
    parts = [FORMAT, torch.__version__, transformers.__version__, sys.version, _text(structure), sources]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _source_hash(cls: type) -> str:
    path = inspect.getsourcefile(cls)
    if path is None:
        raise OSError(f"no source for {cls.__qualname__}")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _text(value) -> str:
    """A stable text for the structure key: classes by module path, everything else by repr."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, tuple):
        return "(" + ",".join(_text(v) for v in value) + ")"
    return repr(value)


def entry_paths(key: str | None) -> tuple[Path, Path] | None:
    folder = cache_dir("capture")
    return None if folder is None or key is None else (folder / f"{key}.json", folder / f"{key}.safetensors")


# ---- writing ------------------------------------------------------------------------------
def save(template: fx.GraphModule, key: str | None) -> bool:
    """Write ``template`` (model tensors as meta tensors, from ``trace._template``) under ``key``; False if the
    graph holds something this format does not write, or the cache is off or not writable."""
    paths = entry_paths(key)
    if paths is None:
        return False
    try:
        doc, constants = _document(template)
    except NotStorable:
        return False
    try:
        if constants:
            atomic_write_bytes(paths[1], safetensors.torch.save({k: v.contiguous() for k, v in constants.items()}))
        atomic_write_bytes(paths[0], json.dumps(doc, separators=(",", ":")).encode())
    except Exception:  # a cache that cannot be written is no cache: the capture itself succeeded
        return False
    return True


def _document(template: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        gm = guards_as_nodes(template)
    except NotPortable as err:
        raise NotStorable(str(err)) from err
    modules, constants, model_tensors, nodes = {}, {}, {}, []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            modules[node.target] = _module_spec(gm.get_submodule(node.target))
        elif node.op == "get_attr":
            tensor = fetch_attr(gm, node.target)
            if not isinstance(tensor, torch.Tensor):
                raise NotStorable(node.target)
            if tensor.device.type == "meta":
                model_tensors[node.target] = isinstance(tensor, nn.Parameter)
            else:
                constants[node.target] = tensor.detach()
        nodes.append(_node_spec(node))
    info = gm.graph._codegen.pytree_info if isinstance(gm.graph._codegen, _PyTreeCodeGen) else None
    if info is None:
        raise NotStorable("codegen")
    try:
        specs = [pytree.treespec_dumps(info.in_spec), pytree.treespec_dumps(info.out_spec)]
    except Exception as err:  # a type outside torch's pytree serialization registry
        raise NotStorable("pytree") from err
    doc = {"format": FORMAT, "class_name": type(gm).__name__, "orig_args": list(info.orig_args), "specs": specs,
           "modules": modules, "model_tensors": model_tensors, "constants": sorted(constants), "nodes": nodes,
           "training": gm.training}
    return doc, constants


def _module_spec(module: nn.Module) -> dict:
    if isinstance(module, AttentionDropout):
        return {"kind": "attention_dropout", "p": module.p, "is_causal": module.is_causal, "scale": module.scale,
                "enable_gqa": module.enable_gqa}
    if type(module) is nn.Dropout:
        return {"kind": "dropout", "p": module.p}
    raise NotStorable(type(module).__name__)


def _node_spec(node: fx.Node) -> dict:
    spec = {"name": node.name, "op": node.op, "target": _target(node), "args": _value(node.args),
            "kwargs": _value(node.kwargs)}
    stack = node.meta.get("nn_module_stack")
    if stack:
        spec["stack"] = [[k, path, type_name if isinstance(type_name, str) else _text(type_name)]
                         for k, (path, type_name) in stack.items()]
    if node.op == "placeholder":
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            spec["val"] = {"dtype": str(val.dtype).removeprefix("torch."),
                           "shape": [d if isinstance(d, int) else None for d in val.shape]}
        else:
            spec["val"] = {"const": _value(val)}
    return spec


def _target(node: fx.Node):
    if node.op != "call_function":
        return node.target
    fn = node.target
    if isinstance(fn, torch._ops.OpOverload):
        return {"op": fn.overloadpacket._qualified_op_name, "overload": fn._overloadname}
    if id(fn) in _PY_NAMES and _PY_FUNCTIONS[_PY_NAMES[id(fn)]] is fn:
        return {"py": _PY_NAMES[id(fn)]}
    raise NotStorable(str(fn))


def _value(v):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple" if isinstance(v, tuple) else "list": [_value(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _value(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, (torch.layout, torch.memory_format)):
        return {"torch": str(v).removeprefix("torch.")}
    if isinstance(v, slice):
        return {"slice": [_value(v.start), _value(v.stop), _value(v.step)]}
    raise NotStorable(type(v).__name__)


# ---- reading ------------------------------------------------------------------------------
def load(key: str | None, tensors: dict[str, torch.Tensor]) -> fx.GraphModule | None:
    """The graph stored under ``key`` with ``tensors`` (the model's, by name) bound in; None when there is no
    usable entry (missing, unreadable, naming anything this format does not write, or not fitting the model)."""
    paths = entry_paths(key)
    if paths is None or not paths[0].is_file():
        return None
    try:
        doc = json.loads(paths[0].read_bytes())
        if doc.get("format") != FORMAT:
            return None
        constants = safetensors.torch.load_file(paths[1]) if doc["constants"] else {}
        return _build(doc, tensors, constants)
    except Exception:  # a damaged or foreign entry: capture as if there were none
        return None


def _build(doc: dict, tensors: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    root = nn.Module()
    for name, is_param in doc["model_tensors"].items():
        tensor = tensors[name]
        if isinstance(tensor, nn.Parameter) != is_param:
            raise ValueError(name)
        owner, leaf = _owner(root, name)
        (owner._parameters if is_param else owner._buffers)[leaf] = tensor
    for name in doc["constants"]:
        owner, leaf = _owner(root, name)
        owner.register_buffer(leaf, constants[name])
    for name, spec in doc["modules"].items():
        owner, leaf = _owner(root, name)
        owner.add_module(leaf, _module(spec))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in doc["nodes"]:
        args, kwargs = _read(spec["args"], env), _read(spec["kwargs"], env)
        op, target = spec["op"], spec["target"]
        if op == "call_module" and target not in doc["modules"]:
            raise ValueError(target)
        if op == "call_function":
            target = _resolve(target)
        node = graph.create_node(op, target, args, kwargs, name=spec["name"])
        if node.name != spec["name"]:
            raise ValueError(spec["name"])
        if "stack" in spec:
            node.meta["nn_module_stack"] = {k: (path, type_name) for k, path, type_name in spec["stack"]}
        if "val" in spec:
            val = spec["val"]
            node.meta["val"] = (_read(val["const"], env) if "const" in val else
                                torch.empty([2 if d is None else d for d in val["shape"]], dtype=getattr(torch, val["dtype"]),
                                            device="meta"))
        env[node.name] = node
    in_spec, out_spec = (pytree.treespec_loads(s) for s in doc["specs"])
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(doc["orig_args"], in_spec, out_spec))
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=doc["class_name"])
    gm.train(doc["training"])
    return gm


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The module that holds attribute ``dotted`` (empty containers made on the way) and the leaf name."""
    *parents, leaf = dotted.split(".")
    owner = root
    for part in parents:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    return owner, leaf


def _module(spec: dict) -> nn.Module:
    if spec["kind"] == "dropout":
        return nn.Dropout(float(spec["p"]))
    if spec["kind"] == "attention_dropout":
        return AttentionDropout(float(spec["p"]), bool(spec["is_causal"]), spec["scale"], bool(spec["enable_gqa"]))
    raise ValueError(spec["kind"])


def _resolve(target: dict):
    if "op" in target:
        namespace, _, name = target["op"].partition("::")
        if not (namespace.isidentifier() and name.isidentifier()):
            raise ValueError(target)
        op = getattr(getattr(getattr(torch.ops, namespace), name), target["overload"] or "default")
        if not isinstance(op, torch._ops.OpOverload):
            raise ValueError(target)
        return op
    return _PY_FUNCTIONS[target["py"]]


def _read(v, env: dict[str, fx.Node]):
    if not isinstance(v, dict):
        return v
    (kind, x), = v.items()
    if kind == "node":
        return env[x]
    if kind in ("tuple", "list"):
        items = [_read(i, env) for i in x]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _read(i, env) for k, i in x.items()}
    if kind == "float":
        return float(x)
    if kind == "dtype":
        return _torch_attr(x, torch.dtype)
    if kind == "device":
        return torch.device(x)
    if kind == "torch":
        return _torch_attr(x, (torch.layout, torch.memory_format))
    if kind == "slice":
        return slice(*(_read(i, env) for i in x))
    raise ValueError(kind)


def _torch_attr(name: str, kind):
    value = getattr(torch, name)
    if not isinstance(value, kind):
        raise ValueError(name)
    return value
