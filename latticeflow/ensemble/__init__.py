"""HDF5 ensemble files (schema v1 of DESIGN §6): append-only writer and validating reader.

What lives where (one concept each)
-----------------------------------
* :mod:`~latticeflow.ensemble.layout`: layout and schema: format constants and storage types,
  the root attributes and empty datasets of a new file, :class:`EnsembleMetadata`,
  :class:`Ensemble`, :func:`row_datasets` and the validation of a file's header;
* :mod:`~latticeflow.ensemble.storage`: files on disk: opening, publishing and syncing files,
  the write errors (:class:`DiskSpaceError`, :class:`EnsembleWriteError`) and file ownership
  ("Locking");
* :mod:`~latticeflow.ensemble.writer`: where an :class:`EnsembleWriter` comes from: a new file
  (``create``) or one to continue (``resume``);
* :mod:`~latticeflow.ensemble.commit`: durable commits: what an open writer does (``append``,
  ``set_attributes``, ``close``) and how a chunk is committed ("Crash safety", "Durability");
* :mod:`~latticeflow.ensemble.resume`: resume state: the two slots and how an entry is stored;
* :mod:`~latticeflow.ensemble.recovery`: the file a killed writer left: the superblock's end of
  allocation raised, or the committed state copied into a new file;
* :mod:`~latticeflow.ensemble.reader`: reading: :class:`EnsembleReader`, :func:`read_ensemble`;
* :mod:`~latticeflow.ensemble.shards`: :func:`join_shards` ("Joined shards");
* :mod:`~latticeflow.ensemble.proposals`: the proposal summary a neural-MCMC file records
  (:func:`~latticeflow.ensemble.proposals.read_proposal_summary`);
* :mod:`~latticeflow.ensemble.output`: :func:`~latticeflow.ensemble.output.open_output`, a
  sampling run's output file (new, replaced or resumed) with the checks of a user's file.
"""

from latticeflow.ensemble.layout import (
    CHAIN_DATASET,
    COMMON_DATASETS,
    FORMAT,
    FORMAT_VERSION,
    LENGTH_ATTR,
    RESUME_GROUP,
    RESUME_SLOTS,
    ROW_DTYPES,
    SAMPLER_DATASETS,
    SAMPLERS,
    SHARDS_ATTR,
    Ensemble,
    EnsembleMetadata,
    row_datasets,
)
from latticeflow.ensemble.reader import EnsembleReader, read_ensemble
from latticeflow.ensemble.shards import join_shards
from latticeflow.ensemble.storage import DiskSpaceError, EnsembleWriteError, sync_folder
from latticeflow.ensemble.writer import EnsembleWriter

__all__ = [
    "CHAIN_DATASET", "COMMON_DATASETS", "FORMAT", "FORMAT_VERSION", "LENGTH_ATTR", "RESUME_GROUP",
    "RESUME_SLOTS", "ROW_DTYPES", "SAMPLERS", "SAMPLER_DATASETS", "SHARDS_ATTR",
    "DiskSpaceError", "Ensemble", "EnsembleMetadata", "EnsembleReader", "EnsembleWriteError",
    "EnsembleWriter", "join_shards", "read_ensemble", "row_datasets", "sync_folder",
]
