"""The HTTP server: its own ports (``[http]``), routes offered by modules (``http_routes()``)."""
