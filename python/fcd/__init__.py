"""fcd: focal cortical dysplasia detection by classifier-guided diffusion.

The fcd engine (Rust, CPU and CUDA) from Python: load a model once with ``fcd.Engine``,
then call ``detect`` on slices or ``detect_volume`` on co-registered FLAIR and T1 volumes.
Results equal those of the ``fcd detect`` command for the same inputs and options.

>>> import fcd
>>> engine = fcd.Engine("config.yaml", "model_t1_cond_99.pt", device="auto")
>>> det = engine.detect(flair, t1, steps=100, seed=7)   # flair, t1: (B, H, W) arrays
>>> det.anomaly.shape, det.peaks[0]
"""

from ._fcd import (
    Detection,
    Engine,
    FcdError,
    Peak,
    VolumeDetection,
    VolumePeak,
    __version__,
)

__all__ = [
    "Detection",
    "Engine",
    "FcdError",
    "Peak",
    "VolumeDetection",
    "VolumePeak",
    "__version__",
]
