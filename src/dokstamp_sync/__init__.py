"""dokstamp-sync: keeps a university ERP/SIS in step with the DokStamp certificate API."""

__version__ = "0.1.0"
