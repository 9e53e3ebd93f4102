"""`tensorrt.plugin` for tests on machines without TensorRT, strict enough to catch misuse of its API.

TensorRT cannot be installed here (its import needs libnvinfer and a GPU driver), but `tensorrt.plugin` itself
is pure Python over a handful of binding classes. Two backends, same surface:

  * `real_plugin_api(src)`: NVIDIA's own `plugin/*.py` (shipped in the `tensorrt-cu12-bindings` /
    `tensorrt-cu13-bindings` wheels as `tensorrt_bindings/plugin/`), imported as `tensorrt.plugin` on top of
    `FakeCore`, a stand-in for the compiled `tensorrt` module. Its own validation and shape-expression code
    run unchanged. Found through $DSV4C_TRT_PLUGIN_SRC (a directory holding plugin/_lib.py, e.g. an unzipped
    bindings wheel's tensorrt_bindings/) or an installed tensorrt / tensorrt_bindings package, located without
    importing it.
  * `StrictPluginAPI`: this file's re-statement of the rules of that package that dsv4c's plugins touch, each
    with its source (tensorrt-cu12-bindings 11.4.0.106, tensorrt_bindings/plugin/<file>: <function>). Used
    where the real sources are absent; tests run both where they can, so a drift shows up as a disagreement.

Shape expressions evaluate: every dimension carries its value, and TensorRT's "is it a build-time constant"
flag, so a test can read back the grid and extra arguments an AOT implementation hands to TensorRT.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

# ---- the compiled `tensorrt` module's surface used by tensorrt.plugin ------------------------------------------
_OPERATIONS = {  # trt.DimensionOperation -> evaluation
    "SUM": lambda a, b: a + b, "PROD": lambda a, b: a * b, "MAX": max, "MIN": min, "SUB": lambda a, b: a - b,
    "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b), "FLOOR_DIV": lambda a, b: a // b,
    "CEIL_DIV": lambda a, b: -(-a // b),
}


class _Enum:
    """A binding enum: any member name is a member (the package only compares and passes them on)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, member: str) -> str:
        if member.startswith("__"):
            raise AttributeError(member)
        return f"{self._name}.{member}"


class _Binding:
    """A binding class the package subclasses or instantiates (IPluginV3..., PluginField, Dims): inert."""

    def __init__(self, *args, **kwargs):
        self._args = args


class IDimensionExpr(_Binding):
    """trt.IDimensionExpr that evaluates: `value` always, `constant` as TensorRT would report it."""

    def __init__(self, value: int, constant: bool):
        super().__init__()
        self.value, self.constant = int(value), constant

    def is_constant(self) -> bool:
        return self.constant

    def get_constant_value(self) -> int:
        if not self.constant:
            raise RuntimeError("not a build-time constant")
        return self.value


class IExprBuilder(_Binding):
    def constant(self, value: int) -> IDimensionExpr:
        if not isinstance(value, int):  # the binding's signature: constant(self, value: int)
            raise TypeError(f"IExprBuilder.constant takes an int, got {type(value).__name__}")
        return IDimensionExpr(value, True)

    def operation(self, op: str, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if not (isinstance(first, IDimensionExpr) and isinstance(second, IDimensionExpr)):
            raise TypeError(f"IExprBuilder.operation takes two IDimensionExpr, got {first!r}, {second!r}")
        value = _OPERATIONS[op.split(".")[-1]](first.value, second.value)
        return IDimensionExpr(value, first.constant and second.constant)


class _Registry:
    def __init__(self):
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


class _Logger(_Binding):
    WARNING, ERROR, INFO, VERBOSE = "WARNING", "ERROR", "INFO", "VERBOSE"

    def log(self, severity, message):
        pass


def fake_core() -> types.ModuleType:
    """A stand-in for the compiled `tensorrt` module: enums, an evaluating IDimensionExpr / IExprBuilder, a plugin
    registry, inert binding classes for the rest. QuickPluginCreationRequest is there: AOT plugins enabled."""
    core = types.ModuleType("tensorrt")
    for enum in ("DataType", "DimensionOperation", "PluginFieldType", "TensorFormat", "PluginArgDataType",
                 "PluginArgType", "TensorRTPhase", "PluginCapabilityType"):
        setattr(core, enum, _Enum(enum))
    core.float32, core.float16, core.int64, core.int32 = (core.DataType.FLOAT, core.DataType.HALF,
                                                         core.DataType.INT64, core.DataType.INT32)
    core.uint8, core.bfloat16 = core.DataType.UINT8, core.DataType.BF16
    core.IDimensionExpr, core.IExprBuilder, core.Logger = IDimensionExpr, IExprBuilder, _Logger
    registry = _Registry()
    core.get_plugin_registry = lambda: registry
    bindings: dict[str, type] = {}

    def binding(name: str) -> type:  # module __getattr__: one inert class per binding name
        if name.startswith("__"):
            raise AttributeError(name)
        return bindings.setdefault(name, type(name, (_Binding,), {}))

    core.__getattr__ = binding
    core.QuickPluginCreationRequest = binding("QuickPluginCreationRequest")
    core.Dims = type("Dims", (_Binding,), {"MAX_DIMS": 8})  # nvinfer1::Dims::MAX_DIMS
    return core


# ---- backend 1: NVIDIA's tensorrt.plugin over the fake core ------------------------------------------------------
def find_real_plugin_sources() -> Path | None:
    """The directory holding NVIDIA's plugin/*.py, or None."""
    env = os.environ.get("DSV4C_TRT_PLUGIN_SRC")
    candidates = [Path(env)] if env else []
    for package in ("tensorrt_bindings", "tensorrt"):
        try:
            spec = importlib.util.find_spec(package)  # locates without importing (which needs libnvinfer)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    return next((c for c in candidates if (c / "plugin" / "_lib.py").is_file()), None)


class RealPluginAPI:
    """NVIDIA's tensorrt.plugin imported over fake_core(); `close()` removes both from sys.modules again (other
    tests check that `import tensorrt` fails here)."""

    def __init__(self, src: Path):
        self.trt = fake_core()
        self.trt.__path__ = [str(src)]  # `tensorrt.plugin` resolves to src/plugin
        self._saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
        for k in self._saved:
            del sys.modules[k]
        sys.modules["tensorrt"] = self.trt
        self.trtp = importlib.import_module("tensorrt.plugin")
        self._tensor = importlib.import_module("tensorrt.plugin._tensor")
        self._lib = importlib.import_module("tensorrt.plugin._lib")
        self._forget()

    def _forget(self) -> None:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[k]
        sys.modules.update(self._saved)

    def close(self) -> None:
        self._tensor.SymIntExpr._exprBuilder = None

    def shape_context(self, builder: IExprBuilder) -> None:
        """What TensorRT does before calling a shape / AOT function: install the expression builder."""
        self._tensor.SymIntExpr._exprBuilder = builder

    def definition(self, plugin_id: str):
        """{"register" | "impl" | "aot_impl" | "autotune": the decorated function or None}, as recorded."""
        d = self._lib.QDP_REGISTRY[plugin_id]
        return {"register": d.register_func, "impl": d.impl_func, "aot_impl": d.aot_impl_func,
                "autotune": d.autotune_func}

    def registered(self) -> set[str]:
        return set(self._lib.QDP_REGISTRY)

    def tensor_desc(self, dims: list[IDimensionExpr], dtype=None):
        return self.trtp.TensorDesc(self.trtp.ShapeExprs.from_tuple(tuple(self.trtp.ShapeExpr(d) for d in dims)),
                                    self.trt.float32 if dtype is None else dtype)


# ---- backend 2: the rules, re-stated ------------------------------------------------------------------------------
class _StrictShapes:
    """Shape expressions (plugin/_tensor.py: SymIntExpr, SymInt32, ShapeExpr, SymExprs, SymIntExprs,
    KernelLaunchParams; plugin/_top_level.py: cdiv, max, min, from_shape_expr)."""

    builder: IExprBuilder | None = None

    class SymExpr:
        pass

    @classmethod
    def build(cls) -> types.SimpleNamespace:
        shapes = cls

        class SymInt32(cls.SymExpr):
            # __init__(value: int | trt.IDimensionExpr | SymIntExpr); ints become builder constants, which need
            # a shape context (outside one the real class makes a "fake" expression that cannot be evaluated)
            def __init__(self, value: Any = None):
                if isinstance(value, SymInt32):
                    value = value._expr
                elif isinstance(value, bool) or not isinstance(value, (int, IDimensionExpr)):
                    raise TypeError(f"SymInt32 / ShapeExpr take an int, IDimensionExpr or SymIntExpr, got {value!r}")
                elif isinstance(value, int):
                    if shapes.builder is None:
                        raise RuntimeError("integer shape expression outside a shape-calculation context")
                    value = shapes.builder.constant(value)
                self._expr = value

            def _op(self, op: str, other: Any):  # SymIntExpr._op: the other side int or expression
                other = other if isinstance(other, SymInt32) else SymInt32(other)
                return type(self)(shapes.builder.operation(f"DimensionOperation.{op}", self._expr, other._expr))

            # + - * // only; no __radd__ / __rmul__ / __truediv__: the real classes have none
            def __add__(self, other):
                return self._op("SUM", other)

            def __sub__(self, other):
                return self._op("SUB", other)

            def __mul__(self, other):
                return self._op("PROD", other)

            def __floordiv__(self, other):
                return self._op("FLOOR_DIV", other)

            @property
            def is_constant(self) -> bool:
                return self._expr.is_constant()

            def constant_value(self) -> int:
                if not self.is_constant:
                    raise RuntimeError("Not accessible for non-constant shape expressions")
                return self._expr.get_constant_value()

        class ShapeExpr(SymInt32):
            pass

        def top_level(op: str):
            def fn(first, second):  # _top_level.py: cdiv / max / min reject two ints
                if isinstance(first, int) and isinstance(second, int):
                    raise ValueError("Both arguments cannot be 'int's")
                first = first if isinstance(first, SymInt32) else ShapeExpr(first)
                return ShapeExpr(first._op(op, second))
            return fn

        class SymExprs:
            def __init__(self, length: int):
                self._exprs = [None] * length

            @classmethod
            def from_tuple(cls, exprs):  # elements: expressions or ints; floats are rejected
                inst = cls(len(exprs))
                inst._exprs = [e if isinstance(e, SymInt32) else SymInt32(e) for e in exprs]
                return inst

            def __iter__(self):
                return iter(self._exprs)

            def __len__(self):
                return len(self._exprs)

            def __getitem__(self, i):
                return self._exprs[i]

        class SymIntExprs(SymExprs):
            pass

        class ShapeExprs(SymExprs):
            pass

        class KernelLaunchParams:
            FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

            def __init__(self):
                for f in self.FIELDS:
                    object.__setattr__(self, f, None)

            def __setattr__(self, name, value):  # only the seven fields, each becoming a SymInt32
                if name not in self.FIELDS:
                    raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
                object.__setattr__(self, name, SymInt32(value))

        return types.SimpleNamespace(SymExpr=cls.SymExpr, SymInt32=SymInt32, ShapeExpr=ShapeExpr,
                                     SymExprs=SymExprs, SymIntExprs=SymIntExprs, ShapeExprs=ShapeExprs,
                                     KernelLaunchParams=KernelLaunchParams, cdiv=top_level("CEIL_DIV"),
                                     max=top_level("MAX"), min=top_level("MIN"))


SERIALIZABLE_ATTR_TYPES = (int, float, bytes, bool, str)  # _validate.py: SERIALIZABLE_BUILTIN_TYPES
RESERVED_NAMESPACES = {"", "trt", "tensorrt", "std"}  # _validate.py
DISALLOWED_ATTR_NAMES = {"outputs", "stream", "tactic"}  # _validate.py


class StrictPluginAPI:
    """The rules of plugin/_validate.py and _lib.py that the decorators enforce, re-stated (no numpy-array
    attributes: dsv4c declares none, so they are rejected here)."""

    def __init__(self):
        self.trt = fake_core()
        self._shapes = type("Shapes", (_StrictShapes,), {})
        ns = self._shapes.build()
        self.trtp = types.SimpleNamespace(**vars(ns))
        t = self.trtp

        class TensorDesc:
            def __init__(self, shape_expr=None, dtype=None):
                self.shape_expr, self.dtype = shape_expr, dtype

        class Tensor:
            pass

        class AutoTuneCombination:  # _autotune.py: (io_types: str, layouts: str, tactics) + .tactics(list)
            def __init__(self, io_types: str | None = None, layouts: str | None = None, tactics=None):
                if not isinstance(io_types, (str, type(None))) or not isinstance(layouts, (str, type(None))):
                    raise TypeError("io_types and layouts are comma-separated strings")
                self.io_types, self._tactics = io_types, tactics

            def tactics(self, tactics) -> None:
                if not all(isinstance(x, int) and x > 0 for x in tactics):
                    raise ValueError("custom tactics must be positive integers")
                self._tactics = list(tactics)

        def from_shape_expr(shape_expr, dtype):
            exprs = ns.ShapeExprs.from_tuple(shape_expr) if isinstance(shape_expr, tuple) else shape_expr
            return TensorDesc(exprs, dtype)

        t.TensorDesc, t.Tensor, t.AutoTuneCombination, t.from_shape_expr = TensorDesc, Tensor, AutoTuneCombination, \
            from_shape_expr
        t.register, t.impl, t.aot_impl, t.autotune = self._register, self._impl, self._aot_impl, self._autotune
        self.defs: dict[str, dict] = {}

    # -- the test-facing surface shared with RealPluginAPI
    def close(self) -> None:
        self._shapes.builder = None

    def shape_context(self, builder: IExprBuilder) -> None:
        self._shapes.builder = builder

    def definition(self, plugin_id: str) -> dict:
        return self.defs[plugin_id]["funcs"]

    def registered(self) -> set[str]:
        return set(self.defs)

    def tensor_desc(self, dims: list[IDimensionExpr], dtype=None):
        return self.trtp.TensorDesc(self.trtp.ShapeExprs.from_tuple(tuple(self.trtp.ShapeExpr(d) for d in dims)),
                                    self.trt.float32 if dtype is None else dtype)

    # -- decorators
    def _register(self, plugin_id: str, lazy_register: bool = False):
        def decorate(fn):
            ns, _, name = plugin_id.partition("::")  # _lib.register: "ns::name"; _validate_name_and_namespace
            if not name or "." in ns or "." in name or ns in RESERVED_NAMESPACES:
                raise ValueError(f"bad plugin id {plugin_id!r}")
            if plugin_id in self.defs:
                raise ValueError(f"already has a definition for {name!r}")
            tensors, attrs = self._register_inputs(fn)
            self._check_register_return(fn)
            self.defs[plugin_id] = dict(tensors=tensors, attrs=attrs, funcs={"register": fn, "impl": None,
                                                                             "aot_impl": None, "autotune": None})
            return fn
        return decorate

    def _register_inputs(self, fn) -> tuple[list[str], dict[str, type]]:
        """_validate._parse_register_inputs: annotated positional-or-keyword args without defaults, TensorDescs
        first (at least one), then attributes of serializable types with allowed names."""
        tensors, attrs = [], {}
        for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise ValueError(f"Argument {name} is not a positional-or-keyword or keyword-only arg")
            if p.annotation is p.empty:
                raise ValueError(f"Argument {name} does not have a type annotation")
            if p.default is not p.empty:
                raise ValueError(f"Argument {name} has a default value")
            if inspect.isclass(p.annotation) and issubclass(p.annotation, self.trtp.TensorDesc):
                if attrs:
                    raise ValueError("TensorDescs args and attribute args cannot be interspersed")
                tensors.append(name)
                continue
            if i == 0:
                raise ValueError("TensorDescs args should come first, followed by attributes")
            if name in DISALLOWED_ATTR_NAMES:
                raise ValueError(f"'{name}' is not allowed as an attribute name")
            if p.annotation not in SERIALIZABLE_ATTR_TYPES:
                raise ValueError(f"Attribute '{name}' of type {p.annotation} is not a supported serializable type")
            attrs[name] = p.annotation
        return tensors, attrs

    def _check_register_return(self, fn) -> None:
        """_validate._parse_register_return: TensorDesc or Tuple[TensorDesc, ...]."""
        ret = inspect.signature(fn).return_annotation
        if ret is inspect.Parameter.empty:
            raise ValueError("No return annotation found for register function")
        args = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
        if not all(inspect.isclass(a) and issubclass(a, self.trtp.TensorDesc) for a in args):
            raise ValueError(f"Return types can only be TensorDesc or Tuple[TensorDesc], got {ret}")

    def _check_args(self, kind: str, fn, plugin_id: str, tensor_type: type, tail: list[str]) -> None:
        """_validate._validate_impl / _validate_aot_impl / _validate_autotune: the parameters are exactly the
        registered tensors, a subset of the registered attributes in registration order, then `tail`; annotated
        attributes keep their registered type; annotated `outputs` is Tuple[tensor_type, ...]."""
        if plugin_id not in self.defs:
            raise ValueError(f"Plugin {plugin_id} is not registered")
        d = self.defs[plugin_id]
        params = inspect.signature(fn).parameters
        used = [n for n in params if n in d["attrs"]]
        for name, p in params.items():
            if p.annotation is p.empty:
                continue
            if name == "outputs":
                ok = typing.get_origin(p.annotation) is tuple and all(
                    issubclass(a, tensor_type) for a in typing.get_args(p.annotation))
                if not ok:
                    raise ValueError(f"'outputs' should be of type Tuple[{tensor_type.__name__}]")
            elif name in ("stream", "tactic"):
                if not (inspect.isclass(p.annotation) and issubclass(p.annotation, int)):
                    raise ValueError(f"'{name}' input argument should be an int")
            elif inspect.isclass(p.annotation) and issubclass(p.annotation, tensor_type):
                if name not in d["tensors"]:
                    raise ValueError(f"Unexpected tensor '{name}' in the {kind} function")
            elif d["attrs"].get(name) != p.annotation:
                raise ValueError(f"Attribute '{name}' is not registered with type {p.annotation}")
        expected = d["tensors"] + [n for n in d["attrs"] if n in used] + tail
        if list(params) != expected:
            raise ValueError(f"Signature of the {kind} function {list(params)} does not match {expected}")

    def _impl(self, plugin_id: str):
        def decorate(fn):
            tactic = "tactic" in inspect.signature(fn).parameters
            self._check_args("impl", fn, plugin_id, self.trtp.Tensor, ["outputs", "stream"] + ["tactic"] * tactic)
            ret = inspect.signature(fn).return_annotation
            if ret is not inspect.Parameter.empty and ret is not None:
                raise ValueError("Return annotation should be None.")
            self.defs[plugin_id]["funcs"]["impl"] = fn
            return fn
        return decorate

    def _aot_impl(self, plugin_id: str):
        def decorate(fn):
            self._check_args("aot_impl", fn, plugin_id, self.trtp.TensorDesc, ["outputs", "tactic"])
            self._check_aot_return(inspect.signature(fn).return_annotation)
            self.defs[plugin_id]["funcs"]["aot_impl"] = fn
            return fn
        return decorate

    def _check_aot_return(self, ret) -> None:
        """_validate._validate_aot_impl: Tuple[str | bytes, str | bytes, KernelLaunchParams, <SymExprs>]."""
        args = typing.get_args(ret) if typing.get_origin(ret) is tuple else ()
        if len(args) != 4:
            raise ValueError(f"aot_impl return annotation is {ret}; expected a 4-tuple")
        for a in args[:2]:
            parts = typing.get_args(a) if typing.get_origin(a) in (Union, types.UnionType) else (a,)
            if not all(x in (str, bytes) for x in parts):
                raise ValueError(f"kernel name / PTX annotated {a}; expected str or bytes")
        if not issubclass(args[2], self.trtp.KernelLaunchParams) or not issubclass(args[3], self.trtp.SymExprs):
            raise ValueError(f"aot_impl return annotation is {ret}; expected (.., KernelLaunchParams, SymExprs)")

    def _autotune(self, plugin_id: str):
        def decorate(fn):
            self._check_args("autotune", fn, plugin_id, self.trtp.TensorDesc, ["outputs"])
            ret = inspect.signature(fn).return_annotation
            args = typing.get_args(ret) if typing.get_origin(ret) is list else (ret,)
            if ret is not inspect.Parameter.empty and not all(
                    inspect.isclass(a) and issubclass(a, self.trtp.AutoTuneCombination) for a in args):
                raise ValueError("autotune returns AutoTuneCombination or List[AutoTuneCombination]")
            self.defs[plugin_id]["funcs"]["autotune"] = fn
            return fn
        return decorate


def value_of(expr: Any) -> int:
    """The evaluated value of a shape / integer expression from either backend (or a plain int)."""
    if isinstance(expr, int):
        return expr
    inner = expr._expr
    if not isinstance(inner, IDimensionExpr):
        raise TypeError(f"{expr!r} does not wrap an evaluated dimension (built outside a shape context?)")
    return inner.value
