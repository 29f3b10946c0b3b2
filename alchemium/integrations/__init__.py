"""Integrations with web frameworks and tools; each submodule needs its optional extra.

- ``alchemium.integrations.fastapi`` (``pip install 'alchemium[fastapi]'``): one
  UnitOfWork per request, committed after the endpoint returns.
"""
