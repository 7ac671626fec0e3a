"""eplb-plugin: an expert parallelism load balancer for Mixture-of-Experts serving.

Importing the package is cheap: it touches no GPU and imports neither triton, sglang nor
deep_ep. Submodules are imported on use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
