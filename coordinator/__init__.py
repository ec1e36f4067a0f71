"""The coordinator: Flower ServerApp, round planning and running, run records, operator CLI."""
