"""Raw text -> WebDataset tar shards + manifest (`bertscale prepare`), the same bytes for any
number of processes or MPI ranks, resumable after a crash (pipeline.py says how)."""

from bertscale.data.prepare.config import START_TIMEOUT_S, PrepareConfig
from bertscale.data.prepare.pipeline import run_prepare
from bertscale.data.prepare.progress import Progress
from bertscale.data.prepare.ranks import Context, MPIContext, collective, detect_context
from bertscale.data.prepare.units import tokenize_documents
from bertscale.data.prepare.upload import UPLOAD_RECORD, default_stage, upload_prepared

__all__ = ["START_TIMEOUT_S", "UPLOAD_RECORD", "Context", "MPIContext", "PrepareConfig",
           "Progress", "collective", "default_stage", "detect_context", "run_prepare",
           "tokenize_documents", "upload_prepared"]
