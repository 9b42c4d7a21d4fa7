"""Flower ClientApp glue: receives the global model and config, replies with an update."""
