"""What operators read and run: status, the health check, Prometheus metrics, dead letters."""
