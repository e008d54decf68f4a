"""Type stubs of the extension module fcd._fcd (see the docstrings at run time)."""

import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "os.PathLike[str]"]
_Floats = Union[npt.NDArray[np.float32], npt.NDArray[np.float64]]
_Progress = Callable[[int, int], object]

class FcdError(ValueError):
    """The engine's one-line message: a bad file, input, option or device."""

class Peak:
    """A local maximum of an anomaly map on the network's grid."""

    @property
    def slice(self) -> int: ...
    @property
    def row(self) -> int: ...
    @property
    def col(self) -> int: ...
    @property
    def score(self) -> float:
        """The anomaly map at the peak (each slice's map peaks at 1)."""
    @property
    def strength(self) -> float:
        """The map before its per-slice normalisation there; ranks peaks across slices."""

class Detection:
    """Results on slices, as ``fcd detect`` writes them."""

    @property
    def pseudo_healthy(self) -> npt.NDArray[np.float32]:
        """(B, 1, H, W) in [-1, 1]."""
    @property
    def anomaly(self) -> npt.NDArray[np.float32]:
        """(B, H, W) in [0, 1]."""
    @property
    def peaks(self) -> list[Peak]:
        """Strongest first (by strength)."""
    @property
    def steps(self) -> int: ...
    @property
    def guidance(self) -> float: ...
    @property
    def batch(self) -> int: ...
    def save(self, dir: _Path) -> None:
        """Writes pseudo_healthy.npy, anomaly.npy and summary.json into ``dir``, as
        ``fcd detect`` does, all at once. Raises FcdError on a failure (nothing is left in
        ``dir``), and for the network-grid results of a VolumeDetection (save that)."""

class VolumePeak:
    """A peak in the volume: axial slice z, voxel position, world position (mm)."""

    @property
    def slice(self) -> int: ...
    @property
    def voxel_x(self) -> float: ...
    @property
    def voxel_y(self) -> float: ...
    @property
    def world_mm(self) -> Tuple[float, float, float]: ...
    @property
    def score(self) -> float:
        """The anomaly map at the peak (each slice's map peaks at 1)."""
    @property
    def strength(self) -> float:
        """The map before its per-slice normalisation there; ranks peaks across slices."""

class VolumeDetection:
    """Results on the input volume's grid."""

    @property
    def anomaly(self) -> npt.NDArray[np.float32]:
        """(x, y, z), zero outside the slices."""
    @property
    def pseudo_healthy(self) -> npt.NDArray[np.float32]:
        """(x, y, z) in each slice's intensity range, zero outside the slices."""
    @property
    def peaks(self) -> list[VolumePeak]:
        """Strongest first (by strength)."""
    @property
    def slices(self) -> Tuple[int, int]:
        """The axial slices (first, last), inclusive."""
    @property
    def steps(self) -> int: ...
    @property
    def guidance(self) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def network(self) -> Detection:
        """The results on the network's grid."""
    def save(self, dir: _Path) -> None:
        """Writes anomaly.nii.gz and pseudo_healthy.nii.gz on the input's grid, the overlays,
        montage.png and summary.json into ``dir``, as ``fcd detect`` does, all at once.
        Raises FcdError on a failure (nothing is left in ``dir``)."""

class Engine:
    """The diffusion config and both networks, loaded once on a device.

    Every bad argument of every method (a wrong type, None where a value is needed, an
    integer out of range, an array of the wrong shape or of more than 2**30 values) raises
    FcdError, a ValueError. None is the default of every optional argument. A call from
    inside the progress callback of a call on the same engine raises FcdError ("the engine
    is busy"); calls from other threads wait their turn, answering Ctrl-C meanwhile.
    """

    def __init__(
        self,
        config: _Path,
        unet: _Path,
        classifier: Optional[_Path] = None,
        device: Optional[str] = "auto",
        precision: Optional[str] = "fp32",
    ) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def image_size(self) -> int: ...
    def detect(
        self,
        flair: _Floats,
        t1: _Floats,
        *,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        seed: Optional[int] = 0,
        noise: Optional[_Floats] = None,
        hist_match: Optional[bool] = True,
        batch: Optional[int] = None,
        progress: Optional[_Progress] = None,
    ) -> Detection: ...
    def detect_volume(
        self,
        flair: _Floats,
        t1: _Floats,
        *,
        slices: Optional[Tuple[int, int]] = (75, 125),
        mask: Optional[npt.ArrayLike] = None,
        affine: Optional[Union[npt.ArrayLike, Sequence[Sequence[float]]]] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        seed: Optional[int] = 0,
        noise: Optional[_Floats] = None,
        hist_match: Optional[bool] = True,
        batch: Optional[int] = None,
        progress: Optional[_Progress] = None,
    ) -> VolumeDetection: ...
