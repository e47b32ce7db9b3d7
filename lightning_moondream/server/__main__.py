"""``python -m lightning_moondream.server``: serve the local tuning service."""

from lightning_moondream.server.serve import main

main()
