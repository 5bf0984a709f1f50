"""lightning-chaos: see, and use, the chaos in your training dynamics.

Lightning callbacks that step ε-perturbed shadow copies of your model in lockstep with it and measure how fast they
separate: d(t), local and running Lyapunov exponents, time-to-accuracy; and how close the network's own map sits to
the edge of chaos.
"""

from lightning_chaos import functional
from lightning_chaos.edge import EdgeOfChaosMonitor
from lightning_chaos.finder import ChaosLRFinder, ChaosLRFinderResult, find_chaos_lr
from lightning_chaos.probe import ChaosProbe
from lightning_chaos.tangent import TangentProbe

__version__ = "0.1.0"

__all__ = [
    "ChaosLRFinder",
    "ChaosLRFinderResult",
    "ChaosProbe",
    "EdgeOfChaosMonitor",
    "TangentProbe",
    "find_chaos_lr",
    "functional",
    "__version__",
]
