"""A study whose run directory is in an S3 bucket (`--out s3://bucket/run`), end to end, against
a local S3 server (moto's), through the same pyarrow S3 client a real bucket is written with.

The oracle is the same study run into a local folder: the metrics read back from the bucket
(with pyarrow, outside bplab) must be those rows, and the commands a user types on a run
(`status`, `runs`, `--resume`, `report`, `analysis.load`) must work on the URI as on a path.
"""

from __future__ import annotations

import threading

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.helpers import bplab, bplab_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

moto_server = pytest.importorskip("moto.server")
werkzeug_serving = pytest.importorskip("werkzeug.serving")

STUDY = ["moons-quick", "--only", "tanh-h3", "deep", "--set", "epochs=300", "--no-report"]
VOLATILE = ["wall_time", "examples_per_sec"]


def _s3_app():
    """moto's S3 as a WSGI app. moto 5.2 names the root element of its CompleteMultipartUpload
    answer CompleteMultipartUploadResponse where S3 says CompleteMultipartUploadResult, which
    the AWS SDK inside pyarrow rejects (getmoto/moto#10055): that one element is renamed."""
    app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)

    def fixed(environ, start_response):
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(app(environ, capture))
        headers = captured["headers"]
        if b"<CompleteMultipartUploadResponse" in body:
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers)
        return [body]

    return fixed


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint with one empty bucket; the environment a user would set for it."""
    server = werkzeug_serving.make_server("127.0.0.1", 0, _s3_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = bplab_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                    AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_port}", AWS_EC2_METADATA_DISABLED="true")
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                           endpoint_override=f"127.0.0.1:{server.server_port}", allow_bucket_creation=True)
    fs.create_dir("studies")
    try:
        yield {"env": env, "fs": fs}
    finally:
        server.shutdown()


def metrics(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.drop(columns=VOLATILE).astype({"case_id": str})
    return frame.sort_values(["case_id", "step", "split"]).reset_index(drop=True)


def test_a_study_in_a_bucket_reads_like_one_in_a_folder(s3, tmp_path):
    env, fs = s3["env"], s3["fs"]
    local = bplab("run", *STUDY, "--out", tmp_path / "local", cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stdout + local.stderr

    uri = "s3://studies/moons"
    remote = bplab("run", *STUDY, "--out", uri, cwd=tmp_path, env=env)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert f"run {uri}" in remote.stderr and f"{uri}: 2 done" in remote.stderr, remote.stderr

    # read back with pyarrow alone: the same rows as the local run, and no staging files left
    files = [i.path for i in fs.get_file_info(pafs.FileSelector("studies/moons", recursive=True))]
    assert not [f for f in files if ".tmp-" in f or "/.staged-" in f], files
    assert "studies/moons/driver.lock" not in files  # released at the end
    from_bucket = pq.read_table("studies/moons/metrics", filesystem=fs).to_pandas()
    from_folder = pd.read_parquet(tmp_path / "local" / "metrics")
    assert len(from_bucket) == 2 * 300 * 2  # two cases, 300 steps, train and test rows
    pd.testing.assert_frame_equal(metrics(from_bucket), metrics(from_folder), check_categorical=False)

    status = bplab("status", uri, cwd=tmp_path, env=env)
    assert status.returncode == 0 and status.stdout.count(" done ") == 2, status.stdout + status.stderr
    runs = bplab("runs", "s3://studies", cwd=tmp_path, env=env)
    assert runs.returncode == 0 and "moons-quick" in runs.stdout and "2 done" in runs.stdout, runs.stdout + runs.stderr
    missing = bplab("runs", "s3://studies/none", cwd=tmp_path, env=env)
    assert missing.returncode == 2 and missing.stderr.strip() == "bplab: error: runs: s3://studies/none is not a folder"

    again = bplab("run", "--resume", uri, "--no-report", cwd=tmp_path, env=env)  # nothing left to run
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(pq.read_table("studies/moons/metrics", filesystem=fs)) == len(from_bucket)

    report = bplab("report", uri, "--out", tmp_path / "report", cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "tanh-h3" in text and "deep" in text

    load = bplab_python(f"import analysis; d = analysis.load({uri!r}); print(len(d.metrics), sorted(d.cases['name']))",
                        tmp_path, env)
    assert load.returncode == 0 and load.stdout.split()[0] == str(len(from_bucket)), load.stdout + load.stderr


def bplab_python(code: str, cwd, env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
