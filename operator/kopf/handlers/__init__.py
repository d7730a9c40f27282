"""The operator's controllers, one module per concern; ``vqkd.operator.kopf.main`` registers them."""
