"""Fixtures shared by the tests; plain helpers are in tests/helpers.py."""

import functools
import http.server
import sys
import threading

import pytest
import torch

from tests.helpers import REPO_ROOT

# The tests import this checkout's package (and projects/, benchmarks/),
# not an installed copy.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import mmdet_dyhead  # noqa: E402,F401  (registers the modules)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread only
    adds synchronisation, which costs 10-30x on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests_seen = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests_seen.append(self.path)
        super().do_GET()


@pytest.fixture
def http_root(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1 (random port) for one test.

    Yields ``(www folder, base URL, list of requested paths)``.
    """
    www = tmp_path / 'www'
    www.mkdir()
    seen = []
    handler = type('Handler', (_QuietHandler,), {'requests_seen': seen})
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(handler, directory=str(www))
    )
    server.timeout = 5
    thread = threading.Thread(
        target=server.serve_forever, kwargs={'poll_interval': 0.1}, daemon=True
    )
    thread.start()
    try:
        yield www, f'http://127.0.0.1:{server.server_address[1]}', seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
