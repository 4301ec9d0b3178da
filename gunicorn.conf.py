"""gunicorn settings for the web process (read from the working directory).

WEB_CONCURRENCY: worker processes (default 2 x CPU cores + 1, gunicorn's advice: while
one worker waits on the database another uses the core). GUNICORN_TIMEOUT: seconds a
request may take before its worker is restarted (default 60; a 1000-event batch takes
well under a second).
"""

import multiprocessing
import os

workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2 + 1)
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 60)
# Reuse the worker's database connection (CONN_MAX_AGE) across keep-alive requests.
keepalive = 5
