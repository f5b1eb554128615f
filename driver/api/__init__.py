"""What users and operators talk to: the CLI's service (gRPC), Prometheus metrics, reports."""
