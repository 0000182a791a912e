"""The container image, built and run for real with podman: `make image-test` (`python -m tests.image`).

Not collected by `make test` (no test_ modules): it needs root, podman and several minutes. What it
proves, and what it measured, is in the README's "Deploy with docker-compose".
"""
