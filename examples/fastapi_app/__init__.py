"""A small users API on alchemium and FastAPI; see app.py."""
