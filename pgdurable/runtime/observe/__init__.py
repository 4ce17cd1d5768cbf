"""Observability of a running node: the supervisor's Prometheus endpoint (``exporter``)."""
