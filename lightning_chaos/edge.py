"""EdgeOfChaosMonitor: how close the network's own map sits to the edge of chaos, recorded as it trains."""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_chaos import logging as chaos_logging
from lightning_chaos.functional.edge import (
    asymptotic_jacobian_norm,
    edge_of_chaos_boundary,
    map_lyapunov_exponent,
    order_parameters,
)

QUANTITIES = ("epoch", "step", "J0", "J", "J_c", "edge_distance", "lyapunov", "jacobian_norm")
_ACTIVATION_NAMES: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}
_KNOWN_BOUNDARIES: dict[type, str] = {nn.Tanh: "tanh", nn.ReLU: "relu"}
_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")

LayerSpec = Union[Sequence[str], Mapping[str, Union[str, Callable[[Tensor], Tensor]]]]
MapFn = Callable[[LightningModule, Tensor], Tensor]


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.modules.activation.__name__


def _first_tensor(batch: Any) -> Optional[Tensor]:
    """The inputs of a batch as Lightning's examples lay it out: the batch itself, its first item, or a dict's first
    tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class _BadInput(ValueError):
    """Input found wrong at the first batch: raised to the user, not swallowed like a fault of ours."""


class _Layer:
    """A square Linear layer's map x ↦ φ(Wx + b) and what the mean field knows of φ."""

    def __init__(self, module: nn.Linear, activation: Optional[Callable[[Tensor], Tensor]], boundary: Optional[str]):
        self.module = module
        self.activation = activation
        self.boundary = boundary  # "tanh", "relu" or None (no mean-field edge for this φ)
        self.inputs: Optional[Tensor] = None


class _PointMap(nn.Module):
    """A user's map as a module of one point: the estimators vmap over points and call a module with its parameters
    detached (much faster under torch.func); the user's fn sees a batch of one."""

    def __init__(self, pl_module: LightningModule, fn: MapFn) -> None:
        super().__init__()
        self.inner = pl_module
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.inner, x.unsqueeze(0)).squeeze(0)


class EdgeOfChaosMonitor(Callback):
    r"""Record how close the network's own map is to the edge between order and chaos, at fit start and every epoch.

    Two lenses on chaos meet here. :class:`~lightning_chaos.ChaosProbe` asks how chaotic the *training* is; this
    callback asks how chaotic the *network* is, as a map iterated on its own output (Feng, Zhang & Lai 2019; Zhang,
    Feng, Chen & Lai 2021). For each square weight layer (a ``torch.nn.Linear`` with fan-in = fan-out, with the
    activation module that follows it in the forward pass) it records

    * the order parameters J0 = N·mean(W), J = √N·std(W) (:func:`~lightning_chaos.functional.order_parameters`),
    * the mean-field edge J_c(J0/J) for tanh and ReLU (:func:`~lightning_chaos.functional.edge_of_chaos_boundary`)
      and the distance to it, ``edge_distance`` = ln(J/J_c): < 0 ordered, 0 on the edge, > 0 chaotic (for
      |J0/J| < 1 with tanh it is the mean-field exponent ln J of the ordered phase),
    * the exponent of the layer map x ↦ φ(Wx + b) iterated from the inputs the layer really receives
      (:func:`~lightning_chaos.functional.map_lyapunov_exponent`) and its asymptotic Jacobian norm
      (:func:`~lightning_chaos.functional.asymptotic_jacobian_norm`, edge at 1): the measured side of the mean field,
      which also holds for trained, non-i.i.d. weights.

    For a square *sub-network* (seed paper 1: an MLP 784-100-784-10 iterated from the input to its third layer), name
    it in ``maps``; it gets the exponent and the Jacobian norm.

    A record is taken at fit start (before the first optimizer step) and after every ``every_n_epochs`` epochs.
    Its starting points are the layer's inputs in the first training batch of the fit, then of each recorded epoch
    (up to ``num_inputs`` rows), captured by a forward hook during that one batch; nothing runs on the other batches.
    The records go to ``history`` and to every logger under ``chaos/edge/<layer>/<quantity>``; with a TensorBoard
    logger the phase diagram (:meth:`plot`) is added as a figure at each record.

    Observation does not perturb: the measurements run on detached copies of the weights, with the RNG streams
    forked and the module's train/eval flags restored, so the training is bit-identical with and without the monitor.
    Records are computed on global rank 0 only.

    Args:
        layers: ``None`` (default) finds every square ``Linear`` followed by an activation module. A list of module
            names (as ``named_modules()`` gives them) picks those, their activation still found in the forward pass
            (none found: the identity). A mapping from name to ``"tanh"``, ``"relu"`` or a callable sets the activation,
            for one applied functionally (``torch.tanh(self.fc(x))``), which the hook cannot see.
        maps: named square sub-networks, ``{"name": fn}`` with ``fn(pl_module, x) -> y`` of x's shape, for ``x`` a batch
            shaped like the training batch's inputs (the batch itself, its first item, or a dict's first tensor), whose
            rows are the starting points. Example: ``{"F": lambda m, x: m.net[:5](x)}``, input to the third layer.
        every_n_epochs: record after every N-th epoch (≥ 1), besides fit start.
        num_inputs: the number of starting points (≥ 1): rows of the inputs, as many as the batch holds, at most this.
            Feng et al. average over 100 images.
        steps: iterations of the map per record (≥ 2); the Jacobian norm is taken at the last iterate.
        transient: iterations left out of the exponent (0 ≤ transient < steps). ``steps=500, transient=100`` are the
            papers'; each record then costs about 2·steps matrix products of num_inputs × N by N × N per layer, plus
            the Jacobian at the end (measured: benchmarks/RESULTS.md).
        log_figure: add the phase diagram to TensorBoard at each record (needs matplotlib).

    Raises:
        ValueError: at construction for an argument out of its range; at fit start for a name in ``layers`` that is not
            a square ``nn.Linear`` of the model; at the first batch for a map in ``maps`` that is not square (the
            message names it).

    Example:
        >>> from lightning.pytorch import Trainer, seed_everything
        >>> from lightning_chaos import EdgeOfChaosMonitor
        >>> from lightning_chaos.demo import DigitsDataModule, MLPClassifier
        >>> _ = seed_everything(0, verbose=False)
        >>> monitor = EdgeOfChaosMonitor(num_inputs=16, steps=100, transient=20)  # lighter than the papers' 100/500
        >>> trainer = Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(MLPClassifier(hidden=(64, 64)), datamodule=DigitsDataModule())  # 64-64-64-10, tanh
        >>> sorted(monitor.history)  # the square Linear layers followed by their tanh
        ['net.0', 'net.2']
        >>> record = monitor.history["net.2"]  # quantity -> one value per record
        >>> record["epoch"]  # fit start, then after each epoch
        [0.0, 1.0, 2.0]
        >>> all(d < 0 for d in record["edge_distance"])  # ln(J/J_c) < 0: ordered; > 0 chaotic
        True

        ``monitor.plot()`` draws the phase diagram with each layer's path.
    """

    def __init__(
        self,
        layers: Optional[LayerSpec] = None,
        maps: Optional[Mapping[str, MapFn]] = None,
        every_n_epochs: int = 1,
        num_inputs: int = 100,
        steps: int = 500,
        transient: int = 100,
        log_figure: bool = True,
    ) -> None:
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, (Sequence, Mapping)) or not layers:
                raise ValueError(
                    f"`layers` must be None, a non-empty list of module names or a mapping, got {layers!r}"
                )
            if isinstance(layers, Mapping):
                for name, activation in layers.items():
                    named = isinstance(activation, str) and activation in _ACTIVATION_NAMES
                    if not (named or (callable(activation) and not isinstance(activation, str))):
                        raise ValueError(
                            f"`layers[{name!r}]` must be 'tanh', 'relu' or a callable activation, got {activation!r}"
                        )
        if maps is not None and (not isinstance(maps, Mapping) or not all(callable(fn) for fn in maps.values())):
            raise ValueError(f"`maps` must be a mapping from names to callables fn(pl_module, x), got {maps!r}")
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("num_inputs", num_inputs, 1),
                                 ("steps", steps, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if isinstance(transient, bool) or not isinstance(transient, int) or not 0 <= transient < steps:
            raise ValueError(f"`transient` must be an int with 0 <= transient < steps ({steps}), got {transient!r}")
        if not isinstance(log_figure, bool):
            raise ValueError(f"`log_figure` must be True or False, got {log_figure!r}")
        self.layers = layers
        self.maps = dict(maps or {})
        self.every_n_epochs = every_n_epochs
        self.num_inputs = num_inputs
        self.steps = steps
        self.transient = transient
        self.log_figure = log_figure
        self.history: dict[str, dict[str, list[float]]] = {}
        self._layers: dict[str, _Layer] = {}
        self._map_inputs: Optional[Tensor] = None
        self._capture_hooks: list[Any] = []
        self._capture: tuple = ()
        self._active = False
        self._record_start = False  # the fit-start record is due (taken once the first batch's inputs are seen)
        self._record_epoch = False  # a record is due at this epoch's end
        self._need_capture = False  # this epoch's first batch has not been seen yet

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, layers=repr(self.layers))

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        modules = dict(pl_module.named_modules())
        names = list(self.layers) if self.layers is not None else []
        for name in names:
            module = modules.get(name)
            if not isinstance(module, nn.Linear) or module.in_features != module.out_features:
                found = "no such module" if module is None else repr(module)
                raise ValueError(f"`layers` names {name!r}, which must be a square nn.Linear of the model: {found}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = type(trainer.strategy).__name__
        self._active = trainer.is_global_zero
        if any(name in strategy for name in _SHARDED):
            rank_zero_warn(f"EdgeOfChaosMonitor: the {strategy} strategy shards the weights; records are off.")
            self._active = False
        self._record_start = self._active

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_epoch = self._active and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        self._need_capture = self._record_start or self._record_epoch

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._need_capture:  # the only cost on a batch without a capture is this test
            self._need_capture = False
            self._guarded(self._start_capture, pl_module, batch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._end_capture_and_maybe_record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_capture_and_maybe_record(trainer, pl_module)  # a batch without backward

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._record_epoch and self._active and not self._need_capture:
            self._record_epoch = False
            self._guarded(self._record, trainer, pl_module, self._epochs_done(trainer))

    @staticmethod
    def _epochs_done(trainer: Trainer) -> float:
        """Epochs done at an epoch's end: a whole number, or a fraction when ``max_steps`` ended the epoch early."""
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        total = trainer.num_training_batches
        fraction = batches / total if 0 < total < math.inf else 1.0
        return trainer.current_epoch + min(1.0, fraction)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {"history": {name: {k: list(v) for k, v in record.items()} for name, record in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {name: {k: list(v) for k, v in record.items()} for name, record in state_dict["history"].items()}

    # -- capture --------------------------------------------------------------------------------------------------

    def _start_capture(self, pl_module: LightningModule, batch: Any) -> None:
        if self.maps:
            inputs = _first_tensor(batch)
            if inputs is None:
                raise _BadInput("`maps`: the batch holds no tensor to start the maps from")
            self._map_inputs = inputs.detach()[: self.num_inputs].clone()
        names = {id(module): name for name, module in pl_module.named_modules()}
        square = {
            id(m): m for m in pl_module.modules()
            if isinstance(m, nn.Linear) and m.in_features == m.out_features >= 2  # one weight has no spread
        }
        wanted = set(self.layers) if self.layers is not None else None
        calls: list[nn.Module] = []
        inputs_of: dict[str, Tensor] = {}

        # Global hooks, not per-module ones: a per-module hook would be deep-copied into a ChaosProbe's shadows.
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if id(module) in square and args and isinstance(args[0], Tensor):
                name = names[id(module)]
                if name not in inputs_of and (wanted is None or name in wanted):
                    rows = args[0].detach().reshape(-1, args[0].shape[-1])
                    inputs_of[name] = rows[: self.num_inputs].clone()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if id(module) in names and not next(module.children(), None):
                calls.append(module)

        self._capture_hooks = [
            nn.modules.module.register_module_forward_pre_hook(pre_hook),
            nn.modules.module.register_module_forward_hook(hook),
        ]
        self._capture = (calls, inputs_of, names)

    def _remove_hooks(self) -> None:
        for handle in self._capture_hooks:
            handle.remove()
        self._capture_hooks = []

    def _end_capture_and_maybe_record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._capture_hooks:
            return
        self._remove_hooks()
        self._guarded(self._resolve_layers, trainer, pl_module)
        if self._record_start and self._active:  # before the first optimizer step: the weights the fit starts from
            self._record_start = False
            self._guarded(self._record, trainer, pl_module, trainer.current_epoch)

    def _resolve_layers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        calls, inputs_of, names = self._capture
        modules = dict(pl_module.named_modules())
        following: dict[str, nn.Module] = {}
        for index, module in enumerate(calls[:-1]):
            name = names[id(module)]
            if name in inputs_of and name not in following:
                following[name] = calls[index + 1]
        explicit = self.layers if isinstance(self.layers, Mapping) else {}
        skipped = []
        for name, rows in inputs_of.items():
            after = following.get(name)
            if name in explicit:
                activation = explicit[name]
                boundary = activation if isinstance(activation, str) else _KNOWN_BOUNDARIES.get(type(activation))
                fn = _ACTIVATION_NAMES[activation] if isinstance(activation, str) else activation
            elif after is not None and _is_activation(after):
                fn, boundary = after, _KNOWN_BOUNDARIES.get(type(after))
            elif self.layers is not None:
                fn, boundary = None, None  # named by the user with no activation module after it: the identity
            else:
                skipped.append(name)
                continue
            layer = self._layers.get(name)
            if layer is None:
                layer = self._layers[name] = _Layer(modules[name], fn, boundary)
            layer.inputs = rows
        if skipped and not self.history:
            rank_zero_info(
                f"EdgeOfChaosMonitor: the square layers {skipped} are not followed by an activation module; name them"
                " with `layers={name: 'tanh' | 'relu' | callable}` to record them."
            )
        if not self._layers and not self.maps:
            rank_zero_warn(
                f"EdgeOfChaosMonitor: {type(pl_module).__name__} has no square nn.Linear followed by an activation"
                " module (and no `maps` were given): nothing to record. Name the layers (`layers=`) or give `maps=`."
            )
            self._active = False

    # -- records --------------------------------------------------------------------------------------------------

    def _record(self, trainer: Trainer, pl_module: LightningModule, epochs_done: int) -> None:
        step = trainer.global_step
        records: dict[str, dict[str, float]] = {}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        training = {module: module.training for module in pl_module.modules()}
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            try:
                pl_module.eval()
                for name, layer in self._layers.items():
                    if layer.inputs is not None:
                        records[name] = self._layer_record(layer)
                for name, fn in self.maps.items():
                    if self._map_inputs is not None:
                        records[name] = self._map_record(pl_module, name, fn)
            finally:
                for module, flag in training.items():
                    module.train(flag)
        metrics = {}
        for name, values in records.items():
            entry = self.history.setdefault(name, {quantity: [] for quantity in QUANTITIES})
            for quantity, value in {"epoch": float(epochs_done), "step": float(step), **values}.items():
                entry[quantity].append(value)
                if quantity not in ("epoch", "step"):
                    metrics[chaos_logging.edge_tag(name, quantity)] = value
        chaos_logging.log_metrics(trainer, metrics, step=step)
        if self.log_figure:
            for logger in chaos_logging.tensorboard_loggers(trainer):
                chaos_logging.add_figure(logger, chaos_logging.EDGE_PHASE_DIAGRAM, self.plot, step,
                                         "EdgeOfChaosMonitor")

    def _iterated(self, fn: Callable[[Tensor], Tensor], inputs: Tensor) -> dict[str, float]:
        with torch.autocast(inputs.device.type, enabled=False):
            return {
                "lyapunov": map_lyapunov_exponent(fn, inputs, steps=self.steps, transient=self.transient),
                "jacobian_norm": asymptotic_jacobian_norm(fn, inputs, steps=self.steps),
            }

    def _layer_record(self, layer: _Layer) -> dict[str, float]:
        weight = layer.module.weight.detach().clone()
        bias = None if layer.module.bias is None else layer.module.bias.detach().clone()
        activation = layer.activation

        def layer_map(x: Tensor) -> Tensor:
            h = nn.functional.linear(x, weight, bias)
            return h if activation is None else activation(h)

        j0, j = order_parameters(weight)
        j_c = float(edge_of_chaos_boundary(j0 / j, layer.boundary)) if layer.boundary and j > 0 else math.nan
        assert layer.inputs is not None  # only layers with captured inputs are recorded
        return {
            "J0": j0,
            "J": j,
            "J_c": j_c,
            "edge_distance": math.log(j / j_c) if j > 0 and math.isfinite(j_c) else math.nan,
            **self._iterated(layer_map, layer.inputs.to(weight.dtype)),
        }

    def _map_record(self, pl_module: LightningModule, name: str, fn: MapFn) -> dict[str, float]:
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        assert self._map_inputs is not None  # maps are recorded only once the batch's inputs are captured
        inputs = self._map_inputs.to(device=pl_module.device, dtype=dtype)
        try:
            found = fn(pl_module, inputs[:1])
        except Exception as error:
            raise _BadInput(f"`maps`: {name!r} failed on the batch's inputs of shape {tuple(inputs.shape)}: {error!r}")
        if not isinstance(found, Tensor) or found.shape != inputs[:1].shape:
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise _BadInput(f"`maps`: {name!r} must map inputs of shape {tuple(inputs[:1].shape)} to the same shape (a"
                            f" square map), got {shape}")
        nan = math.nan
        return {"J0": nan, "J": nan, "J_c": nan, "edge_distance": nan, **self._iterated(_PointMap(pl_module, fn), inputs)}

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A fault in a record must never break the real training: warn, stop recording, train on."""
        try:
            return fn(*args)
        except _BadInput:
            raise
        except Exception as error:  # noqa: BLE001
            self._remove_hooks()
            self._active = False
            rank_zero_warn(
                f"EdgeOfChaosMonitor: recording failed ({error!r}); no more records are taken. The real training"
                " continues unaffected."
            )
            return None

    # -- figure ---------------------------------------------------------------------------------------------------

    def plot(self, ax: Optional[Any] = None) -> Any:
        """The phase diagram (x, y) = (J0/J, 1/J): the mean-field edge and the path of each recorded layer.

        The ordered phase lies above the edge curve y = 1/J_c(x), the chaotic phase below it. Each layer's path runs
        from a circle (fit start) to a star (the latest record). Needs matplotlib; draws without a display.

        Args:
            ax: a matplotlib Axes to draw into; ``None`` makes a new figure.

        Returns:
            The matplotlib Figure.
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            figure, ax = plt.subplots(figsize=(6.4, 4.8))
        else:
            figure = ax.figure
        paths = {
            name: (torch.tensor(r["J0"]) / torch.tensor(r["J"]), 1.0 / torch.tensor(r["J"]))
            for name, r in self.history.items()
            if r["J"] and math.isfinite(r["J"][0])
        }
        reach = max([2.0] + [float(x.abs().max()) * 1.2 for x, _ in paths.values()])
        kinds = {layer.boundary for layer in self._layers.values() if layer.boundary} or {"tanh"}
        # J_c rises like a square root just beyond |J0/J| = 1: sample that corner densely
        corner = 1.0 + torch.logspace(-4, -0.5, 24, dtype=torch.float64)
        ratios = torch.cat([torch.linspace(-reach, reach, 121, dtype=torch.float64), corner, -corner]).sort().values
        for kind in sorted(kinds):
            ax.plot(ratios, 1.0 / edge_of_chaos_boundary(ratios, kind), "k-" if kind == "tanh" else "k--",
                    label=f"edge of chaos ({kind}, mean field)")
        for name, (x, y) in paths.items():
            (line,) = ax.plot(x, y, "-", marker=".", label=name)
            ax.plot(x[:1], y[:1], "o", color=line.get_color())
            ax.plot(x[-1:], y[-1:], "*", markersize=12, color=line.get_color())
        ax.set_xlabel("J0 / J")
        ax.set_ylabel("1 / J")
        ax.set_xlim(-reach, reach)
        ax.set_ylim(bottom=0.0)
        ax.text(0.02, 0.95, "ordered", transform=ax.transAxes, va="top")
        ax.text(0.02, 0.05, "chaotic", transform=ax.transAxes, va="bottom")
        ax.set_title("Edge of chaos: phase diagram of the layer maps")
        ax.legend(loc="upper right", fontsize="small")
        return figure
