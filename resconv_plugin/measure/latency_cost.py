"""``LatencyCost``: the latency of a deployed model in the runtime it will run in.

The same network is not equally fast everywhere: depth / channel pruning at equal FLOPs measured 0.91 in eager
PyTorch, 0.86 under ``torch.compile``, 0.94 in ONNX Runtime and 1.00 in OpenVINO (batch 1,
``benchmarks/results/deploy_latency.md``). A latency budget means something only in the runtime it is measured in,
so every place that measures latency (the depth pruner's lookup table and its measured fit, the joint planner, the
``resconv`` command's report) takes one :class:`LatencyCost`.

Runtimes (:data:`RUNTIMES`):

* ``"eager"``: PyTorch, eval mode, ``torch.no_grad`` (the default: what the library measured before runtimes).
* ``"compile"``: ``torch.compile(dynamic=False)`` (inductor), compiled and warmed up before timing.
* ``"onnxruntime"``: the file of :func:`~resconv_plugin.export_onnx` (static batch, checked against PyTorch), a CPU
  session with every graph optimisation on (extra ``deploy``).
* ``"openvino"``: that ONNX file compiled by OpenVINO for ``"CPU"`` (extra ``openvino``).
* ``"tensorrt"``: that ONNX file built into a TensorRT engine, run on a CUDA stream (extra ``tensorrt``; a CUDA GPU).

Every runtime times the model *as deployed* (:func:`~resconv_plugin.deployed`: gates fused, BatchNorms folded), at
``batch_size`` (the first sample of the example input repeated; None: the example's own batch). What a runtime
builds for a model (the compiled function, the ONNX export and its session) is kept for as long as the model object
lives and its tensors are not changed, so timing one model against many others (a lookup table over N gates: the
full model against each removal) builds N + 1 runners, not one per timing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import itertools
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module
from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.latency import interleaved_latencies, median_latency

__all__ = ["LatencyCost", "RUNTIMES", "RUNTIME_EXTRAS", "describe_latency"]

#: The runtimes a :class:`LatencyCost` times in.
RUNTIMES = ("eager", "compile", "onnxruntime", "openvino", "tensorrt")
#: The pip extra of resconv-plugin that installs each runtime not in PyTorch itself.
RUNTIME_EXTRAS = {"onnxruntime": "deploy", "openvino": "openvino", "tensorrt": "tensorrt"}
_TORCH = ("eager", "compile")
_ONNX = ("onnx", "onnxscript", "onnxruntime")  # export_onnx: the exporter and its check
_PACKAGES = {"onnxruntime": _ONNX, "openvino": _ONNX + ("openvino",), "tensorrt": _ONNX + ("tensorrt",)}
_compiled_names = itertools.count()
_DERIVED = 4  # models derived from others kept by LatencyCost.derived (a fit times the same set up to three times)

Runner = Callable[[], object]


def _require(runtime: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = RUNTIME_EXTRAS[runtime]
        raise ImportError(f"LatencyCost(runtime={runtime!r}) needs the package {module!r}: pip install "
                          f"'resconv-plugin[{extra}]'") from exc


def _positive_int(name: str, value: object, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Settings:
    runtime: str
    batch_size: Optional[int]
    threads: Optional[int]
    channels_last: bool
    device: Optional[str]
    repeats: int
    warmup: int


class LatencyCost:
    """Seconds per forward of a model as deployed, in a chosen runtime, at a chosen batch size and thread count.

    Call it on a model for its median seconds over ``repeats`` runs after ``warmup``; :meth:`compare` times several
    models in turns (A, B, C, A, B, C, ...: a slow spell of a shared machine hits them alike), which is how the
    library compares a pruned model with its baseline.

    Args:
        runtime: one of :data:`RUNTIMES`.
        batch_size: the batch timed: the example input's first sample repeated this many times (None: the example
            input as given).
        threads: CPU threads: ``torch.set_num_threads`` for ``"eager"`` / ``"compile"`` while timing (restored
            after), the intra-op threads of ONNX Runtime, ``INFERENCE_NUM_THREADS`` of OpenVINO (None: each
            runtime's default). Not for ``"tensorrt"``.
        channels_last: time ``"eager"`` / ``"compile"`` in ``torch.channels_last`` memory format (the ONNX-based
            runtimes choose their own layouts).
        device: where the model runs: ``"cpu"`` (default), or a CUDA device for ``"eager"`` / ``"compile"`` /
            ``"tensorrt"`` (``"tensorrt"`` defaults to ``"cuda"``); ONNX Runtime and OpenVINO time on the CPU.
        repeats: timed runs (the median is reported).
        warmup: untimed runs first.

    Raises:
        ValueError: an unknown runtime (the message names the allowed ones) or a setting the runtime cannot take.
        ImportError: the runtime's package is not installed (the message names the pip extra).
        RuntimeError: ``"tensorrt"`` on a machine without CUDA.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
        >>> x = torch.randn(1, 1, 28, 28)
        >>> cost = resconv_plugin.LatencyCost("onnxruntime", batch_size=1, threads=1)
        >>> seconds = cost(model, x)  # the deployed model in ONNX Runtime
        >>> cost.as_dict()["runtime"], cost.as_dict()["batch_size"]
        ('onnxruntime', 1)
        >>> _ = resconv_plugin.convert(model, x, level="block")
        >>> pruner = resconv_plugin.LayerPruner(model, x, latency_reduction=0.3, latency_cost=cost)  # budget in ORT
    """

    def __init__(self, runtime: str = "eager", *, batch_size: Optional[int] = 1, threads: Optional[int] = None,
                 channels_last: bool = False, device: Union[str, torch.device, None] = None, repeats: int = 20,
                 warmup: int = 3) -> None:
        if not isinstance(runtime, str) or runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        batch_size = _positive_int("batch_size", batch_size, optional=True)
        threads = _positive_int("threads", threads, optional=True)
        repeats = _positive_int("repeats", repeats)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if device is None:
            device = "cuda" if runtime == "tensorrt" else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        if runtime == "tensorrt":
            if not torch.cuda.is_available():
                raise RuntimeError("LatencyCost(runtime='tensorrt') needs a CUDA GPU, and torch.cuda.is_available() "
                                   "is False on this machine: time on the CPU with 'onnxruntime' or 'openvino'")
            if device.type != "cuda":
                raise ValueError(f"runtime 'tensorrt' runs on a CUDA device, got device={str(device)!r}")
            if threads is not None:
                raise ValueError("threads set CPU threads: runtime 'tensorrt' runs on the GPU (leave threads=None)")
        elif runtime in ("onnxruntime", "openvino") and device.type != "cpu":
            raise ValueError(f"runtime {runtime!r} times on the CPU here, got device={str(device)!r} (on a GPU use "
                             "'eager', 'compile' or 'tensorrt')")
        if channels_last and runtime not in _TORCH:
            raise ValueError(f"channels_last is a PyTorch memory format: runtime {runtime!r} chooses its own layouts "
                             "(leave channels_last=False)")
        for module in _PACKAGES.get(runtime, ()):
            _require(runtime, module)
        self._settings = _Settings(runtime, batch_size, threads, bool(channels_last), str(device), repeats, warmup)
        # model -> (fingerprint, runner): what the runtime built for the model, while it lives unchanged
        self._runners: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Runner]]" = weakref.WeakKeyDictionary()
        # (id of a model, key) -> (the model, weakly; its fingerprint; the model derived from it), the latest few
        self._derived: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()

    # ------------------------------------------------------------------------------------------------ settings
    runtime = property(lambda self: self._settings.runtime, doc="The runtime (one of :data:`RUNTIMES`).")
    batch_size = property(lambda self: self._settings.batch_size, doc="The batch timed (None: the example's).")
    threads = property(lambda self: self._settings.threads, doc="CPU threads asked for (None: the runtime's).")
    channels_last = property(lambda self: self._settings.channels_last, doc="Channels-last memory format.")
    device = property(lambda self: torch.device(self._settings.device), doc="Where the model runs.")
    repeats = property(lambda self: self._settings.repeats, doc="Timed runs per measurement.")
    warmup = property(lambda self: self._settings.warmup, doc="Untimed runs first.")

    @property
    def version(self) -> str:
        """The runtime's version (torch's for ``"eager"`` and ``"compile"``)."""
        if self.runtime in _TORCH:
            return torch.__version__
        module = _require(self.runtime, self.runtime)
        return str(getattr(module, "__version__", None) or module.get_version()).split("-")[0]

    def as_dict(self) -> Dict[str, Any]:
        """What a report records next to a latency figure: runtime, version, threads, batch size, device, memory
        format and repeats (``threads``: the number used; None where the runtime chooses)."""
        threads = self.threads
        if threads is None and self.runtime in _TORCH:
            threads = torch.get_num_threads()
        return {"runtime": self.runtime, "version": self.version, "threads": threads,
                "batch_size": self.batch_size, "device": str(self.device), "channels_last": self.channels_last,
                "repeats": self.repeats}

    def describe(self) -> str:
        """One line for tables and logs, e.g. ``"onnxruntime 1.32.0, batch 1, 2 threads, cpu"``."""
        return describe_latency(self.as_dict())

    def replace(self, **changes: Any) -> "LatencyCost":
        """A new LatencyCost with some settings changed (e.g. ``repeats=50``); nothing built is shared."""
        return LatencyCost(**{**dataclasses.asdict(self._settings), **changes})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self._settings).items())
        return f"LatencyCost({args})"

    # ------------------------------------------------------------------------------------------------ timing
    def __call__(self, model: nn.Module, example_inputs: ExampleInputs) -> float:
        """Median seconds of one forward of ``model`` as deployed, on ``example_inputs`` at :attr:`batch_size`."""
        inputs = self.inputs(example_inputs)
        with self._threads():
            run = self._runner(check_module(model), inputs)
            return median_latency(run, repeats=self.repeats, warmup=self.warmup, device=self.device)

    def compare(self, models: Mapping[str, nn.Module], example_inputs: ExampleInputs) -> Dict[str, float]:
        """Median seconds of each model as deployed, timed in turns (rotating order) on the same inputs.

        Example:
            >>> times = LatencyCost("eager").compare({"full": model, "pruned": pruned}, x)  # doctest: +SKIP
            >>> times["pruned"] / times["full"]  # doctest: +SKIP
        """
        if not isinstance(models, Mapping) or not models:
            raise TypeError(f"models must be a non-empty mapping of names to modules, got {type(models).__name__}")
        inputs = self.inputs(example_inputs)
        with self._threads():
            runs = {key: self._runner(check_module(model, f"models[{key!r}]"), inputs) for key, model in
                    models.items()}
            return interleaved_latencies(runs, repeats=self.repeats, warmup=self.warmup, device=self.device)

    def derived(self, model: nn.Module, key: Any, build: Callable[[], nn.Module]) -> nn.Module:
        """The model ``build()`` derives from ``model`` (e.g. ``model`` with some gates removed), named ``key``: the
        same one again, with what the runtime built for it, while ``model`` lives unchanged (the latest few are
        kept). Timing one derived model several times (a set of gates measured three times) then exports it once.

        Example:
            >>> build = lambda: without(model, ["layer1.0"])  # doctest: +SKIP
            >>> pruned = cost.derived(model, ("without", "layer1.0"), build)  # doctest: +SKIP
        """
        memo = (id(model), key)
        entry = self._derived.get(memo)
        if entry is not None and entry[0]() is model and entry[1] == _fingerprint(model):
            self._derived.move_to_end(memo)
            return entry[2]
        variant = build()
        self._derived[memo] = (weakref.ref(model), _fingerprint(model), variant)
        while len(self._derived) > _DERIVED:
            self._derived.popitem(last=False)
        return variant

    def inputs(self, example_inputs: ExampleInputs) -> Tuple[torch.Tensor, ...]:
        """The inputs timed: ``example_inputs`` at :attr:`batch_size` (its first sample repeated), on the device,
        in the memory format."""
        inputs = as_input_tuple(example_inputs)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = self.batch_size
        out = []
        for t in inputs:
            t = t.detach()
            if batch is not None and t.dim() > 0:
                t = t[:1].expand(batch, *t.shape[1:])
            t = t.to(self.device)
            out.append(t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous())
        return tuple(out)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """PyTorch's CPU threads set to :attr:`threads` for eager / compile, restored after."""
        if self.threads is None or self.runtime not in _TORCH:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _runner(self, model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Runner:
        """What runs one forward of ``model`` in the runtime: built once per model, input shape and state."""
        key = (_fingerprint(model), tuple((tuple(t.shape), t.dtype) for t in inputs))
        cached = self._runners.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            plain = deployed(model)
            if self.runtime in _TORCH:
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                plain = plain.to(self.device, memory_format=fmt)
                run = _compiled(plain, inputs) if self.runtime == "compile" else (lambda: plain(*inputs))
            else:
                run = getattr(self, f"_{self.runtime}")(plain, inputs)
        self._runners[model] = (key, run)
        return run

    # ------------------------------------------------------------------------------------------------ runtimes
    def _onnx_file(self, plain: nn.Module, inputs: Tuple[torch.Tensor, ...], folder: str) -> Path:
        from resconv_plugin.deploy.onnx_export import export_onnx

        cpu = tuple(t.cpu() for t in inputs)
        return export_onnx(plain.cpu(), cpu, Path(folder) / "model.onnx", dynamic_batch=False).path

    def _onnxruntime(self, plain: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Runner:
        from resconv_plugin.deploy.onnx_export import onnx_session

        with tempfile.TemporaryDirectory(prefix="resconv-latency-") as folder:
            session = onnx_session(self._onnx_file(plain, inputs, folder), threads=self.threads or 0)
        feed = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feed)

    def _openvino(self, plain: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Runner:
        ov = _require("openvino", "openvino")
        config = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}
        with tempfile.TemporaryDirectory(prefix="resconv-latency-") as folder:
            compiled = ov.Core().compile_model(str(self._onnx_file(plain, inputs, folder)), "CPU", config)
        request, arrays = compiled.create_infer_request(), [t.cpu().numpy() for t in inputs]
        return lambda: request.infer(arrays)

    def _tensorrt(self, plain: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Runner:  # pragma: no cover (GPU)
        import numpy as np

        trt = _require("tensorrt", "tensorrt")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        with tempfile.TemporaryDirectory(prefix="resconv-latency-") as folder:
            data = self._onnx_file(plain, inputs, folder).read_bytes()
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse the ONNX export: {errors}")
        serialized = builder.build_serialized_network(network, builder.create_builder_config())
        if serialized is None:
            raise RuntimeError("TensorRT could not build an engine for the model (see its log above)")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        context = engine.create_execution_context()
        feeds = iter(t.to(self.device).contiguous() for t in inputs)
        buffers = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffer = next(feeds)
            else:
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
                buffer = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, buffer.data_ptr())
            buffers.append(buffer)
        stream = torch.cuda.Stream(self.device)

        def run() -> None:
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()

        run.keep = (engine, context, buffers)  # alive as long as the runner
        return run


def describe_latency(settings: Optional[Mapping[str, Any]], device: bool = True) -> str:
    """One line for a :meth:`LatencyCost.as_dict` record, e.g. ``"onnxruntime 1.32.0, batch 1, 2 threads, cpu"``
    (``device=False``: without the device; ``"eager"`` for no record: what was timed before runtimes were
    recorded)."""
    if not settings:
        return "eager"
    parts = [f"{settings.get('runtime')} {settings.get('version') or ''}".strip()]
    if settings.get("batch_size") is not None:
        parts.append(f"batch {settings['batch_size']}")
    threads = settings.get("threads")
    parts.append(f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads")
    if device:
        parts.append(str(settings.get("device", "cpu")))
    if settings.get("channels_last"):
        parts.append("channels-last")
    return ", ".join(parts)


def _fingerprint(model: nn.Module) -> tuple:
    """The model's structure and the identity and version of each of its tensors: equal as long as nothing was
    swapped, moved or changed in place (an optimiser step bumps a tensor's version)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (tuple(type(m).__name__ for m in model.modules()),
            tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors))


def _compiled(plain: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Runner:
    """``torch.compile`` of ``plain``'s forward, compiled now (not in the timing). Each model gets a function of its
    own (a distinct code object), so dynamo keeps its compiled graph apart: the models of one lookup table would
    otherwise share one code object's cache, run into its recompile limit and quietly fall back to eager, and every
    call would check the guards of all the others."""
    def forward(*args: torch.Tensor) -> object:
        return plain(*args)

    forward.__code__ = forward.__code__.replace(co_name=f"resconv_latency_{next(_compiled_names)}")
    compiled = torch.compile(forward, dynamic=False)
    with torch.no_grad():
        compiled(*inputs)
    return lambda: compiled(*inputs)
