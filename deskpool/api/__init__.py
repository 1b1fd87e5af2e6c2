"""The REST API (FastAPI) and the console proxy: thin edges over the broker."""
