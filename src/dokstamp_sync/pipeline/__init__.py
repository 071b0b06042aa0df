"""How events travel: the producer (ERP side), the stream ingester into the inbox, the retry
scheduler, and the pump that runs both inside every worker and feeds Celery. The ingester
reads the stream (ingest.py); inbox.py writes what it read into the inbox."""
