"""The demo models and the supervised demo Triton: determinism, serving, faults, lifecycle."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.demo.data import FEATURE_ORDER, make_churn_dataset
from gateway.demo.models import churn_probability, train_churn_models
from gateway.demo.triton_process import (
    SHM_DIR,
    TritonProcess,
    port_is_open,
    remove_triton_model_folders,
    write_control_file,
)

# Short tenure + high charges vs long tenure + low charges, plus two middling customers.
ROWS = np.array([[1, 110.0], [70, 20.0], [24, 70.0], [6, 55.5]], dtype=np.float32)


def test_data_and_models_are_deterministic() -> None:
    """The same seed gives bit-identical data and predictions; another seed other data."""
    x1, y1 = make_churn_dataset(n=500, seed=3)
    x2, y2 = make_churn_dataset(n=500, seed=3)
    x3, _ = make_churn_dataset(n=500, seed=4)
    assert x1.dtype == np.float32 and x1.shape == (500, len(FEATURE_ORDER))
    assert y1.dtype == np.int64 and set(np.unique(y1)) <= {0, 1}
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1[:, 0].min() >= 0 and x1[:, 0].max() <= 72
    assert x1[:, 1].min() >= 18 and x1[:, 1].max() <= 120

    first, second = train_churn_models(seed=7), train_churn_models(seed=7)
    for a, b in ((first.gbm, second.gbm), (first.logreg, second.logreg)):
        pa, pb = churn_probability(a, ROWS), churn_probability(b, ROWS)
        assert pa.dtype == np.float32 and pa.shape == (len(ROWS), 1)
        np.testing.assert_array_equal(pa, pb)


def test_gbm_beats_logreg_on_held_out_data() -> None:
    """The data has an interaction only trees capture, so the two demo models really differ."""
    from sklearn.metrics import roc_auc_score

    models = train_churn_models(seed=7)
    x_test, y_test = make_churn_dataset(n=4000, seed=99)
    auc_gbm = roc_auc_score(y_test, churn_probability(models.gbm, x_test).ravel())
    auc_logreg = roc_auc_score(y_test, churn_probability(models.logreg, x_test).ravel())
    assert auc_gbm > auc_logreg + 0.02


def test_control_file_parsing(tmp_path: Path) -> None:
    """Missing file means ok, bad JSON keeps the last good setting, models filters targets."""
    from gateway.demo.triton_server import ControlFile

    path = tmp_path / "control.json"
    control = ControlFile(path)
    assert control.read().mode == "ok"
    write_control_file(path, "error", models=["churn_gbm"])
    state = control.read()
    assert state.mode == "error"
    assert state.applies_to("churn_gbm") and not state.applies_to("churn_logreg")
    path.write_text('{"mode": "sl')  # as seen mid-write by a non-atomic writer
    assert control.read() == state
    path.write_text(json.dumps({"mode": "slow", "delay_ms": 50}))
    assert control.read().applies_to("churn_logreg")
    path.unlink()
    assert control.read().mode == "ok"


# ------------------------------------------------------------------ with a real Triton


@pytest.fixture(scope="module")
def demo_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """One demo Triton for this module's server tests; the last test stops it itself."""
    root = tmp_path_factory.mktemp("demo-triton")
    process = TritonProcess(control_file=root / "control.json", log_path=root / "triton.log")
    process.start()
    yield process
    process.stop()


def infer(url: str, model: str, rows: np.ndarray, timeout: float = 10.0) -> np.ndarray:
    """One binary-tensor inference through tritonclient.http on a fresh connection."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, network_timeout=timeout)
    try:
        features = httpclient.InferInput("features", list(rows.shape), "FP32")
        features.set_data_from_numpy(rows, binary_data=True)
        output = httpclient.InferRequestedOutput("probability", binary_data=True)
        result = client.infer(model, [features], model_version="1", outputs=[output])
        return result.as_numpy("probability")
    finally:
        client.close()


def http_ready(process: TritonProcess, timeout: float = 1.0) -> bool:
    """True if /v2/health/ready answers 200 within ``timeout`` (no proxy involved)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(process.http_base_url + "/v2/health/ready", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.triton
def test_serves_both_models_deterministically(demo_triton: TritonProcess) -> None:
    """Both models answer a batch with probabilities in [0, 1], repeatably, and differently."""
    gbm = infer(demo_triton.http_url, "churn_gbm", ROWS)
    logreg = infer(demo_triton.http_url, "churn_logreg", ROWS)
    for probs in (gbm, logreg):
        assert probs.dtype == np.float32 and probs.shape == (len(ROWS), 1)
        assert np.all((probs >= 0.0) & (probs <= 1.0))
    np.testing.assert_array_equal(gbm, infer(demo_triton.http_url, "churn_gbm", ROWS))
    np.testing.assert_array_equal(logreg, infer(demo_triton.http_url, "churn_logreg", ROWS))
    assert not np.allclose(gbm, logreg, atol=1e-3)
    assert gbm[0, 0] > 0.5 > gbm[1, 0]  # the obvious churner and the obvious stayer


@pytest.mark.triton
def test_control_file_injects_errors_and_delays(demo_triton: TritonProcess) -> None:
    """The control file makes chosen models fail or slow down live, and ok restores them."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url, row = demo_triton.http_url, ROWS[:1]
    try:
        demo_triton.set_control("error", models=["churn_gbm"])
        with pytest.raises(InferenceServerException, match="injected failure for churn_gbm"):
            infer(url, "churn_gbm", row)
        assert infer(url, "churn_logreg", row).shape == (1, 1)

        demo_triton.set_control("error")  # models omitted: every model fails
        with pytest.raises(InferenceServerException):
            infer(url, "churn_logreg", row)

        demo_triton.set_control("slow", delay_ms=400, models=["churn_logreg"])
        started = time.perf_counter()
        infer(url, "churn_logreg", row)
        assert time.perf_counter() - started >= 0.4
        started = time.perf_counter()
        infer(url, "churn_gbm", row)
        assert time.perf_counter() - started < 0.4

        demo_triton.set_control("ok")
        assert infer(url, "churn_gbm", row).shape == (1, 1)
        # A failed call leaves the model loaded and ready.
        client = httpclient.InferenceServerClient(url)
        try:
            assert client.is_model_ready("churn_gbm", "1")
        finally:
            client.close()
    finally:
        demo_triton.set_control("ok")


@pytest.mark.triton
def test_freeze_kill_restart_and_stop_leave_nothing_behind(demo_triton: TritonProcess) -> None:
    """Freeze hangs and thaw resumes; kill and stop leave no process, port or temp file behind."""
    ports = (demo_triton.http_port, demo_triton.grpc_port, demo_triton.metrics_port)

    demo_triton.freeze()
    assert port_is_open(demo_triton.http_port)  # the kernel still accepts connections...
    assert not http_ready(demo_triton, timeout=0.5)  # ...but nobody answers
    demo_triton.thaw()
    assert http_ready(demo_triton, timeout=5)

    demo_triton.kill()
    assert not demo_triton.is_running()
    assert demo_triton.group_processes() == []
    assert not any(port_is_open(p) for p in ports)

    demo_triton.restart()
    assert (demo_triton.http_port, demo_triton.grpc_port, demo_triton.metrics_port) == ports
    assert infer(demo_triton.http_url, "churn_gbm", ROWS[:1]).shape == (1, 1)
    pid = demo_triton.pid
    assert pid is not None
    assert "tritonserver" in {comm for _, comm in demo_triton.group_processes()}
    workdir = demo_triton.workdir
    assert workdir is not None and workdir.is_dir()

    started = time.perf_counter()
    demo_triton.stop()
    assert time.perf_counter() - started < 15
    assert not any(port_is_open(p) for p in ports)
    assert demo_triton.group_processes() == []  # tritonserver and stubs included
    assert not list(SHM_DIR.glob(f"pytrtion{pid}-*"))  # Python-backend shared memory
    assert not workdir.exists()  # PyTriton workspace with its copy of tritonserver
    assert remove_triton_model_folders(workdir) == []  # Triton's /tmp/folderXXXXXX copies
    demo_triton.stop()  # idempotent
