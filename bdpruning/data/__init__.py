"""Labelled images, from the files they live in to batches on the model's device.

``hdf5`` (the one reader of the course's HDF5 sets) -> ``forms`` (every accepted form of
data as one ordered :class:`~bdpruning.data.forms.ImageData`) -> ``feed`` (batches on the
device); ``images`` reads PNG/JPEG files.
"""

from .hdf5 import H5ImageSet, read_h5_dataset

__all__ = ["H5ImageSet", "read_h5_dataset"]
