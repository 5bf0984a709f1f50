"""The compatibility suite's harness: one real training setup is a :class:`Case`; three properties are checked on each.

1. Observation never perturbs (:func:`check_observation_never_perturbs`): the same fit from the same seed, with and
   without a ``ChaosProbe``, ends with bit-identical parameters and buffers, optimizer state, RNG streams and logged
   metrics.
2. A shadow is an independent training from its start:

   a. (:func:`check_zero_epsilon_shadow_is_the_real_model`) at ε = 0 the shadow ends as the real model (bit for bit,
      or to float rounding where the case says so: a compiled real model against an eager shadow) and every d(t) is 0;
   b. (:func:`check_shadow_is_an_independent_run`) at ε > 0 the shadow ends where a separate, probe-less fit ends when
      it starts from the shadow's initial state at the moment the probe attached: parameters, buffers and the whole
      optimizer state, param-group keys such as Prodigy's ``d`` included.

3. Where the probe cannot guarantee them it says so (:func:`assert_refused`): ``probe.trusted`` is False and a
   ``UserWarning`` names the problem. Every probed fit also checks that ``trusted is False`` never goes unsaid, and that
   the probe did not disable itself after an internal error.

Tests import this module by name (``from harness import ...``): like ``tests/``, ``tests/compat/`` has no
``__init__.py``, and pytest puts each test file's folder on ``sys.path``.
"""

import copy
import math
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.demos import lstm
from lightning.pytorch.demos import transformer as transformer_demo
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: its conftest, as a script (table.py) too
from conftest import quiet_trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos import ChaosProbe
from lightning_chaos.logging import FINDER_PREFIX, PREFIX

PROBE_FAULT = "stopped probing after an error"
CLONE_FAULT = "could not clone the model"

# -- the setups -------------------------------------------------------------------------------------------------------

STATUSES = ("works", "works with a note", "refused with reason")


@dataclass
class Case:
    """One training setup, rebuilt identically for every fit.

    Args:
        name: test id.
        model: builds the model (called right after ``seed_everything``); may return ``torch.compile(module)``.
        data: the ``trainer.fit`` keyword arguments (``train_dataloaders=``, ``val_dataloaders=``), or ``{}`` when the
            module brings its own dataloaders.
        trainer: Trainer keyword arguments on top of :func:`trainer_for`'s quiet defaults.
        callbacks: builds the user's callbacks, fresh for each fit.
        seed: the seed every fit starts from.
        tolerance: ``None``: shadows agree with real trainings bit for bit. ``(rtol, atol)``: to float rounding (a
            compiled real model against an eager shadow, a batched shadow step).
        probe: extra ``ChaosProbe`` arguments for the observation property (say ``num_shadows=4`` for the batched path).
        training_weights_at_end: a callback overwrites the weights in ``on_train_end`` (SWA and EMA copy their average
            in): compare shadows with the weights as training left them, snapshot before any ``on_train_end``.
        requires: third-party modules the case needs: every fit skips the test (``pytest.importorskip``) without them.
        status: what the probe does with the setup today, one of :data:`STATUSES`: ``"works"`` (the three properties
            hold), ``"works with a note"`` (they hold, with a caveat the note gives: a warning, agreement to rounding,
            a point where the probe stops) or ``"refused with reason"`` (``probe.trusted`` is False, with a warning).
            The README's "Supported setups" table is generated from it (``python tests/compat/table.py --write``).
        note: one plain-English sentence for the table; required unless the status is ``"works"``. Where
            ``tolerance`` is set it must say "rounding" (the README's table promises bit for bit otherwise).
        setup: the setup in words (Markdown) for the table; the name by default.
    """

    name: str
    model: Callable[[], Any]
    data: Callable[[], dict]
    trainer: dict = field(default_factory=dict)
    callbacks: Callable[[], list] = list
    seed: int = 0
    tolerance: Optional[tuple[float, float]] = None
    probe: dict = field(default_factory=dict)
    training_weights_at_end: bool = False
    requires: tuple[str, ...] = ()
    status: str = ""
    note: str = ""
    setup: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Case {self.name!r}: `status` must be one of {STATUSES}, got {self.status!r}")
        if self.status != "works" and not self.note:
            raise ValueError(f"Case {self.name!r}: status {self.status!r} needs a `note` saying what to know")
        if self.tolerance is not None and self.status != "refused with reason" and "rounding" not in self.note:
            raise ValueError(f"Case {self.name!r}: compared to rounding (`tolerance`), so its `note` must say so")
        self.setup = self.setup or self.name

    def __str__(self) -> str:
        return self.name


def trainer_for(**kwargs: Any) -> L.Trainer:
    """The suite's quiet CPU Trainer (``conftest.quiet_trainer``), two epochs unless ``kwargs`` say otherwise."""
    return quiet_trainer(**{"max_epochs": 2, **kwargs})


# -- small models and data ------------------------------------------------------------------------------------------


def classification(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` points in R^8, 3 classes: 4 batches of 16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def loaders(n: int = 64, batch_size: int = 16, validation: bool = False) -> dict:
    """A shuffled training loader (its order is drawn from the global RNG, so a perturbed stream shows) and, with
    ``validation``, an unshuffled validation loader."""
    data = {"train_dataloaders": DataLoader(classification(n), batch_size=batch_size, shuffle=True)}
    if validation:
        data["val_dataloaders"] = DataLoader(classification(32, seed=1), batch_size=16)
    return data


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class MLP(L.LightningModule):
    """8 → 16 → 3 with dropout (and optionally BatchNorm); ``optimizer`` builds the optimizer from the parameters."""

    def __init__(self, optimizer: Callable = sgd, dropout: float = 0.1, batchnorm: bool = False, log: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers)
        self.make_optimizer = optimizer
        self.log_metrics = log

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.log_metrics:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self.parameters())


# -- Lightning's own LSTM demo ----------------------------------------------------------------------------------------


def tiny_wikitext() -> Path:
    """A made-up ``wikitext-2.txt`` for Lightning's own ``WikiText2`` dataset class (which would otherwise download the
    real one): 12 words, 208 tokens with the ``<eos>`` ends, so 25 blocks of 8 and 6 SequenceSampler batches of 4."""
    folder = Path(tempfile.gettempdir()) / "lightning_chaos_compat_wikitext"
    path = folder / "wikitext-2.txt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        words = "the a cat dog sat ran on under mat log red blue".split()
        g = torch.Generator().manual_seed(0)
        lines = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist()) for _ in range(16)]
        path.write_text("\n".join(lines) + "\n")
    return folder


class TinyLightningLSTM(lstm.LightningLSTM):
    """``lightning.pytorch.demos.lstm.LightningLSTM`` as shipped (its ``training_step`` carries ``self.hidden`` from
    batch to batch, its ``on_train_epoch_end`` resets it; ``SequenceSampler`` makes consecutive batches continue each
    other's text), with a tiny ``SimpleLSTM`` and a small LR: the demo's ``SimpleLSTM(33278, 512, 512, 4)`` at lr=20
    is for WikiText-2, which it downloads in ``prepare_data``."""

    def __init__(self) -> None:
        LightningModule.__init__(self)
        self.dataset = transformer_demo.WikiText2(data_dir=tiny_wikitext(), block_size=8, download=False)
        self.model = lstm.SimpleLSTM(vocab_size=self.dataset.vocab_size, ninp=8, nhid=8, nlayers=2, dropout=0.2)
        self.hidden = None

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=lstm.SequenceSampler(self.dataset, batch_size=4))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


# -- fitting --------------------------------------------------------------------------------------------------------


class TrainingWeights(Callback):
    """Snapshots the weights as training left them, before any other callback's ``on_train_end`` (it is listed
    first): SWA and EMA overwrite the model with their average there."""

    params: Optional[dict[str, Tensor]] = None
    buffers: Optional[dict[str, Tensor]] = None

    def on_train_end(self, trainer: L.Trainer, pl_module: LightningModule) -> None:
        self.params, self.buffers = named_parameters(pl_module), named_buffers(pl_module)


@dataclass
class Run:
    """What one fit left behind, snapshot right after ``trainer.fit`` returned."""

    trainer: L.Trainer
    module: LightningModule
    probe: Optional[ChaosProbe]
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    optimizer_state: list[tuple[str, Any]]
    rng: tuple[Tensor, float, float]
    metrics: dict[str, Tensor]
    warnings: list[warnings.WarningMessage]
    training_weights: dict[str, Tensor]
    training_buffers: dict[str, Tensor]

    def warned(self, pattern: str) -> list[str]:
        """The messages of the UserWarnings caught during the fit that match ``pattern`` (a regular expression)."""
        return [str(w.message) for w in self.warnings
                if issubclass(w.category, UserWarning) and re.search(pattern, str(w.message))]


def fit(case: Case, probe: Optional[ChaosProbe] = None, start_from: Optional[Callback] = None,
        callbacks: Sequence[Callback] = (), ckpt_path: Any = None, **trainer_kwargs: Any) -> Run:
    """Fit ``case`` from its seed, with the case's callbacks, then ``callbacks``, then ``probe`` (or ``start_from``,
    which takes the probe's place in the list), and snapshot everything the properties compare."""
    for module_name in case.requires:
        pytest.importorskip(module_name)
    L.seed_everything(case.seed, verbose=False)
    model = case.model()
    weights = TrainingWeights()
    callbacks = [weights, *case.callbacks(), *callbacks, *[c for c in (probe, start_from) if c is not None]]
    trainer = trainer_for(**{**case.trainer, **trainer_kwargs, "callbacks": callbacks})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, **case.data(), ckpt_path=ckpt_path)
        rng = (torch.rand(3), random.random(), float(np.random.rand()))  # the streams right after fit
    module = trainer.lightning_module
    return Run(
        trainer=trainer,
        module=module,
        probe=probe,
        params=named_parameters(module),
        buffers=named_buffers(module),
        optimizer_state=flat(copy.deepcopy(trainer.optimizers[0].state_dict())),
        rng=rng,
        metrics={k: v.detach().clone() for k, v in trainer.callback_metrics.items() if not is_chaos_tag(k)},
        warnings=list(caught),
        training_weights=weights.params if case.training_weights_at_end else named_parameters(module),
        training_buffers=weights.buffers if case.training_weights_at_end else named_buffers(module),
    )


def is_chaos_tag(tag: str) -> bool:
    """A metric of the probe's (``chaos/...``) or of the finder's (``chaos_lr_finder/...``): left out of the comparison
    of logged metrics."""
    return tag.split("/", 1)[0] in (PREFIX, FINDER_PREFIX)


_PLAIN_RUNS: dict[str, Run] = {}


def plain_run(case: Case) -> Run:
    """The case fitted without a probe (cached per case: several properties compare with it)."""
    if case.name not in _PLAIN_RUNS:
        _PLAIN_RUNS[case.name] = fit(case)
    return _PLAIN_RUNS[case.name]


# -- comparisons ----------------------------------------------------------------------------------------------------


def normalized(name: str) -> str:
    """A parameter name without ``torch.compile``'s ``_orig_mod`` level: an eager shadow of a compiled submodule may
    name its parameters without it."""
    return name.replace("._orig_mod.", ".").replace("_orig_mod.", "")


def named_parameters(module: nn.Module) -> dict[str, Tensor]:
    return {normalized(n): p.detach().clone() for n, p in module.named_parameters()}


def named_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {normalized(n): b.detach().clone() for n, b in module.named_buffers()}


def flat(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a nested state (dicts, lists, tuples) with its path."""
    if isinstance(obj, dict):
        return [leaf for key in sorted(obj, key=str) for leaf in flat(obj[key], f"{prefix}/{key}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, value in enumerate(obj) for leaf in flat(value, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def _same(a: Any, b: Any, tolerance: Optional[tuple[float, float]]) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if tolerance is None:
            if torch.equal(a, b):
                return True
            return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.allclose(a.double(), b.double(), rtol=tolerance[0], atol=tolerance[1], equal_nan=True)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b if tolerance is None else math.isclose(a, b, rel_tol=tolerance[0], abs_tol=tolerance[1])
    return type(a) is type(b) and a == b


def assert_same(actual: dict[str, Any], expected: dict[str, Any], what: str,
                tolerance: Optional[tuple[float, float]] = None) -> None:
    """Same keys and, per key, the same value: bit for bit (``tolerance=None``) or to ``(rtol, atol)``."""
    assert list(actual) == list(expected), f"{what}: different entries {list(actual)} vs {list(expected)}"
    differing = [key for key in expected if not _same(actual[key], expected[key], tolerance)]
    detail = ""
    if differing:
        a, b = actual[differing[0]], expected[differing[0]]
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape:
            detail = f" (max |difference| of the first: {(a.double() - b.double()).abs().max().item():.3e})"
        else:
            detail = f" (first: {a!r} vs {b!r})"
    exactly = "bit for bit" if tolerance is None else f"to rtol={tolerance[0]}, atol={tolerance[1]}"
    assert not differing, f"{what} differ {exactly} in {differing}{detail}"


def assert_same_training(probed: Run, plain: Run) -> None:
    """Property 1's comparison: everything the user can observe of a training is bit-identical."""
    assert_same(probed.params, plain.params, "real parameters")
    assert_same(probed.buffers, plain.buffers, "real buffers")
    assert_same(dict(probed.optimizer_state), dict(plain.optimizer_state), "real optimizer state")
    names = ("torch", "python random", "numpy")
    assert_same(dict(zip(names, probed.rng)), dict(zip(names, plain.rng)), "RNG draws after fit")
    assert_same(probed.metrics, plain.metrics, "logged metrics")
    assert probed.trainer.global_step == plain.trainer.global_step


def assert_probe_healthy(run: Run) -> None:
    """The probe neither crashed inside (and disabled itself) nor failed to clone the model."""
    faults = run.warned(PROBE_FAULT) + run.warned(CLONE_FAULT)
    assert not faults, f"the probe failed inside: {faults}"


def assert_untrusted_is_said(run: Run) -> None:
    """Property 3 on every probed fit: ``trusted is False`` always comes with a ChaosProbe UserWarning."""
    if run.probe is not None and run.probe.trusted is False:
        assert run.warned("ChaosProbe"), "probe.trusted is False, but no ChaosProbe warning said why"


def assert_trusted(run: Run) -> None:
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    assert run.probe.trusted is True, f"probe.trusted is {run.probe.trusted!r}; warnings: {run.warned('ChaosProbe')}"


def assert_refused(run: Run, pattern: str) -> None:
    """Property 3: the probe says it cannot guarantee its measurement, in ``probe.trusted`` and in a UserWarning that
    matches ``pattern``."""
    assert_probe_healthy(run)
    assert run.probe.trusted is False, "the probe cannot guarantee this setup, but says it is trusted"
    assert run.warned(pattern), f"no UserWarning matching {pattern!r}; got {run.warned('.')}"


def flat_norm(params: dict[str, Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([p.double().flatten() for p in params.values()])).item()


# -- property 1 -----------------------------------------------------------------------------------------------------


def observer(case: Case) -> ChaosProbe:
    """The probe of property 1: default ε, two shadows (or the case's), logging every step."""
    return ChaosProbe(**{"num_shadows": 2, "log_every_n_steps": 1, **case.probe})


def check_observation_never_perturbs(case: Case, probe: Optional[ChaosProbe] = None, require_trusted: bool = True
                                     ) -> Run:
    """Property 1: with and without ``probe`` (default :func:`observer`), the same fit ends bit-identically. Holds
    for a probe that refuses the setup too (``require_trusted=False``)."""
    probed = fit(case, probe if probe is not None else observer(case))
    assert_probe_healthy(probed)
    assert_untrusted_is_said(probed)
    if require_trusted:
        assert_trusted(probed)
    assert_same_training(probed, plain_run(case))
    return probed


# -- property 2a ----------------------------------------------------------------------------------------------------


def check_zero_epsilon_shadow_is_the_real_model(case: Case, **probe_kwargs: Any) -> Run:
    """Property 2a: at ε = 0 the shadow ends as the real model (weights and optimizer state), and d(t) is 0
    throughout (or within the case's float rounding of ‖θ‖)."""
    probe = ChaosProbe(**{"epsilon": 0.0, "num_shadows": 1, "vectorize": False, "log_every_n_steps": 1, **probe_kwargs})
    run = fit(case, probe)
    assert_trusted(run)
    assert_zero_epsilon_agreement(run, case.tolerance)
    return run


def assert_zero_epsilon_agreement(run: Run, tolerance: Optional[tuple[float, float]],
                                  compare_optimizer: bool = True) -> None:
    probe = run.probe
    distances = probe.distances
    assert distances.shape == (run.trainer.global_step + 1, probe.num_shadows), (
        f"d(t) has {distances.shape[0]} rows for {run.trainer.global_step} optimizer steps: the probe stopped measuring"
    )
    if tolerance is None:
        assert (distances == 0).all(), f"a shadow left the real trajectory: max d = {distances.max().item():.3e}"
    else:
        bound = tolerance[0] * flat_norm(run.training_weights) + tolerance[1]
        assert distances.max().item() <= bound, f"max d = {distances.max().item():.3e} > {bound:.3e}"
    real_state = optimizer_state_to_compare(run.optimizer_state, run.trainer)
    for k, shadow in enumerate(probe.shadow_modules):
        assert_same(named_parameters(shadow), run.training_weights, f"shadow {k}'s parameters", tolerance)
        assert_same(named_buffers(shadow), run.training_buffers, f"shadow {k}'s buffers", tolerance)
        if compare_optimizer:
            shadow_state = optimizer_state_to_compare(flat(probe.shadow_optimizers[k].state_dict()), run.trainer)
            assert_same(shadow_state, real_state, f"shadow {k}'s optimizer state", tolerance)


# -- property 2b ----------------------------------------------------------------------------------------------------


class RecordingProbe(ChaosProbe):
    """A ChaosProbe that records shadow 0's state as it is right after attaching (perturbed, before its first step),
    and the hook it attached in."""

    initial_state: Optional[dict[str, Tensor]] = None
    attached_in: Optional[str] = None
    attached_at_step: Optional[int] = None

    def _attach(self, trainer: L.Trainer, pl_module: LightningModule, restored: Any) -> None:
        super()._attach(trainer, pl_module, restored)
        if self.initial_state is None and self.shadow_modules:
            self.initial_state = copy.deepcopy(self.shadow_modules[0].state_dict())
            self.attached_in = _calling_hook()
            self.attached_at_step = trainer.global_step


def _calling_hook() -> Optional[str]:
    """The name of the Lightning hook (``on_*``) on the call stack, innermost first."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name.startswith("on_"):
            return frame.f_code.co_name
        frame = frame.f_back
    return None


class StartFrom(Callback):
    """Loads ``state`` into the module once, in ``hook`` (``on_train_start`` or ``on_train_batch_start``) at
    ``global_step``: the moment and the callback-list position at which the probe attached in the probed run."""

    def __init__(self, state: dict[str, Tensor], hook: str, global_step: int) -> None:
        self.state, self.hook, self.global_step, self.loaded = state, hook, global_step, False

    def _load(self, trainer: L.Trainer, pl_module: LightningModule, hook: str) -> None:
        if self.loaded or hook != self.hook or trainer.global_step != self.global_step:
            return
        load_normalized(pl_module, self.state)
        self.loaded = True

    def on_train_start(self, trainer: L.Trainer, pl_module: LightningModule) -> None:
        self._load(trainer, pl_module, "on_train_start")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._load(trainer, pl_module, "on_train_batch_start")


def load_normalized(module: nn.Module, state: dict[str, Tensor]) -> None:
    """``module.load_state_dict(state)`` with names matched without ``torch.compile``'s ``_orig_mod`` level."""
    by_name = {normalized(k): v for k, v in state.items()}
    target = module.state_dict()
    missing = [k for k in target if normalized(k) not in by_name]
    assert not missing, f"the shadow's state lacks {missing}"
    module.load_state_dict({k: by_name[normalized(k)] for k in target})


def check_shadow_is_an_independent_run(case: Case, epsilon: float = 1e-3, **probe_kwargs: Any) -> tuple[Run, Run]:
    """Property 2b: a shadow at ε > 0 ends exactly where a separate fit without probe ends that starts from the
    shadow's initial state (loaded where and when the probe attached; the RNG streams are the real run's, which the
    probe does not perturb)."""
    probe = RecordingProbe(**{"epsilon": epsilon, "num_shadows": 1, "vectorize": False, "sentinel_steps": 0,
                              "log_every_n_steps": 1, **probe_kwargs})
    probed = fit(case, probe)
    assert_trusted(probed)
    assert probe.initial_state is not None, "the probe never attached"
    assert probe.distances[0].item() > 0, "ε > 0 did not displace the shadow"
    start_from = StartFrom(probe.initial_state, probe.attached_in, probe.attached_at_step)
    separate = fit(case, start_from=start_from)
    assert start_from.loaded, (
        f"the separate fit never reached the moment the probe attached ({probe.attached_in} at global step"
        f" {probe.attached_at_step}): StartFrom loads in on_train_start or on_train_batch_start only"
    )
    shadow_weights = named_parameters(probe.shadow_modules[0])
    assert_same(shadow_weights, separate.training_weights, "shadow parameters vs the separate fit's", case.tolerance)
    assert_same(named_buffers(probe.shadow_modules[0]), separate.training_buffers,
                "shadow buffers vs the separate fit's", case.tolerance)
    assert_same(optimizer_state_to_compare(flat(probe.shadow_optimizers[0].state_dict()), separate.trainer),
                optimizer_state_to_compare(separate.optimizer_state, separate.trainer),
                "shadow optimizer state (param-group keys included) vs the separate fit's", case.tolerance)
    assert not torch.equal(torch.cat([p.flatten() for p in shadow_weights.values()]),
                           torch.cat([p.flatten() for p in probed.training_weights.values()])), \
        "the shadow ended on the real model: ε had no effect"
    return probed, separate


_SCHEDULED = re.compile(r"^/param_groups\[\d+\]/(lr|initial_lr)$")


def optimizer_state_to_compare(state: list[tuple[str, Any]], trainer: L.Trainer) -> dict[str, Any]:
    """A flattened optimizer state, less the LR where an LR scheduler runs: the real scheduler steps once more after the
    last optimizer step, setting an LR for a step that never comes; a shadow keeps the LR of the last step it took.
    Every other param-group key stays (Prodigy's ``d``, schedule-free's ``weight_sum``, a finetuning callback's new
    group)."""
    scheduled = bool(trainer.lr_scheduler_configs)
    return {path: value for path, value in state if not (scheduled and _SCHEDULED.match(path))}


def group_keys(state: list[tuple[str, Any]], key: str) -> dict[str, Any]:
    """The values of param-group key ``key`` (Prodigy's ``d``, say) in a flattened optimizer state."""
    return {path: value for path, value in state if path.startswith("/param_groups") and path.endswith(f"/{key}")}
