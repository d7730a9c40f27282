"""vqkd: virtualized control and key management plane for QKD networks."""
