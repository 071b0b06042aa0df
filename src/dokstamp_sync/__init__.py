"""dokstamp-sync: keeps a university ERP/SIS in step with the DokStamp certificate API."""

from dokstamp_sync.pipeline.producer import enqueue

__all__ = ["enqueue"]
__version__ = "0.1.0"
