"""CLI command groups. Each module exposes `register(app)`; heavy imports stay inside the commands."""
