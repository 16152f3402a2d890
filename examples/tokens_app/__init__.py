"""The demo: a FastAPI service of API tokens whose expired tokens are cleaned up periodically.

``python -m examples.tokens_app`` seeds a few short-lived tokens and serves the app on
http://localhost:8000 with the clean-up every 5 s; ``curl localhost:8000/tasks`` shows each
periodic job's runs, ``curl localhost:8000/health/tasks`` whether they are healthy. See
``docs/demo.md``.
"""
