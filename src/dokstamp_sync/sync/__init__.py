"""The graph walk: from one inbox event to DokStamp calls (see :mod:`.engine`)."""
