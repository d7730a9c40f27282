"""The operator's handlers, one module per concern; ``vqkd.operator.kopf.main`` registers them."""
