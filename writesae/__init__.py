"""writesae: sparse autoencoders with rank-1 matrix atoms for the state and write of Gated DeltaNet layers.

The core (this package's top level) imports without TransformerLens; `writesae.splice` attaches SAEs to a
`hooked_gdn.HookedGatedDeltaNet`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("writesae")  # pyproject.toml's, as installed: the one place the version is written
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

from .io import load_sae, save_sae
from .sae import ARCHITECTURES, BilinearMatrixSAE, FlatSAE, MatrixSAE, SAEConfig

__all__ = ["ARCHITECTURES", "BilinearMatrixSAE", "FlatSAE", "MatrixSAE", "SAEConfig", "load_sae", "save_sae", "__version__"]
