import functools
import http.server
import os
import sys
import threading

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import mmdet_dyhead  # noqa: E402,F401  (registers the modules)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used across the tests."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


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


def pyramid(
    batch=2,
    channels=32,
    size=(40, 56),
    levels=5,
    dtype=torch.float32,
    requires_grad=False,
):
    """A random feature pyramid whose level l+1 is ceil(level l / 2)."""
    feats = []
    h, w = size
    for _ in range(levels):
        feats.append(
            torch.randn(
                batch, channels, h, w, dtype=dtype, requires_grad=requires_grad
            )
        )
        h, w = (h + 1) // 2, (w + 1) // 2
    return feats


def subprocess_env():
    """Environment for child processes that must import this source tree."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    return env


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
