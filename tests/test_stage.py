"""`fastgal stage` and shard URLs against real servers on 127.0.0.1, started here: an HTTP server that serves a
shard folder and injects faults (5xx, a stall past the timeout, a connection dropped mid-body, a flipped byte, a
missing shard), and moto's S3-protocol server for s3:// through s3fs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import run_cli

TOKEN = "s3cr3t-SIGNATURE-42"


class FaultServer(ThreadingHTTPServer):
    """Serves folders (`self.folders[prefix]`) at http://127.0.0.1:PORT/<prefix>/<file>; `faults[file]` is a list of
    faults the next requests for that file get, one each: 503, 404, stall, drop, flip."""

    daemon_threads = True

    def __init__(self):
        self.folders: dict[str, Path] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[str] = []  # every path asked for, its query included
        self.stall = 3.0
        super().__init__(("127.0.0.1", 0), _Handler)

    def url(self, prefix: str, query: str = f"token={TOKEN}") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{prefix}/" + (f"?{query}" if query else "")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def _serve(self, body: bool) -> None:
        srv: FaultServer = self.server
        srv.requests.append(self.path)
        prefix, _, name = urlsplit(self.path).path.strip("/").partition("/")
        fault = srv.faults[name].pop(0) if srv.faults.get(name) else None
        path = srv.folders.get(prefix, Path("/nonexistent")) / name
        if fault == "503":
            self.send_error(503)
            return
        if fault == "404" or not path.is_file():
            self.send_error(404)
            return
        data = bytearray(path.read_bytes())
        if fault == "flip":
            data[len(data) // 2] ^= 0x01
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if fault in ("stall", "drop"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(srv.stall)
            self.close_connection = True
            return
        self.wfile.write(data)

    def do_GET(self):
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)


@pytest.fixture
def server(survey_shards):
    srv = FaultServer()
    srv.folders["sh"] = survey_shards
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("FASTGAL_STAGE_BACKOFF", "0.05")


def _tars(folder: Path) -> dict[str, str]:
    m = json.loads((folder / "manifest.json").read_text())
    return {e["file"]: e["sha256"] for sp in m["shards"].values() for e in sp}


def _partials(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp", ".link"))]


def test_stage_survives_every_fault_and_takes_nothing_unverified(server, survey_shards, tmp_path, fast_retries):
    """503, a stall past --timeout, a dropped connection and a flipped byte: each retried and re-fetched; the
    staged folder is byte for byte the source; the token never appears in what it prints or writes."""
    tars = sorted(_tars(survey_shards))
    assert len(tars) >= 4
    idx = tars[3].replace(".tar", ".idx")
    server.faults.update({tars[0]: ["503", "drop"], tars[1]: ["flip"], tars[2]: ["stall"], idx: ["flip"],
                          "manifest.json": ["503"]})
    server.stall = 3.0
    cache = tmp_path / "cache"
    res = run_cli("stage", server.url("sh"), cache, "--timeout", 1, "--retries", 3, "--json")
    out = json.loads(res.stdout)
    folder = Path(out["folder"])
    assert out["fetched"] == len(tars) and out["cached"] == 0
    assert len(out["retries"]) == 5, out["retries"]  # 503 + drop, flip, stall, idx flip (+ the manifest's 503)
    said = "\n".join(out["retries"])
    assert "sha256" in said and "503" in said and f"{idx}?token=*** does not match the tar" in said
    for name in tars:  # what was kept: exactly the source's bytes
        assert (folder / name).read_bytes() == (survey_shards / name).read_bytes()
        assert (folder / name.replace(".tar", ".idx")).read_bytes() == (survey_shards / name.replace(".tar", ".idx")).read_bytes()
    assert not _partials(cache)
    # the token travels to the server with every file, and appears nowhere in what fastgal says or writes
    assert all(TOKEN in r for r in server.requests)
    written = "".join(p.read_text() for p in folder.iterdir() if p.suffix in (".json", ".csv"))
    assert TOKEN not in res.output and TOKEN not in written and "token=***" in (folder / ".fastgal-stage.json").read_text()
    # the staged folder is what every command reads: info re-checks it whole
    assert run_cli("info", folder).exit_code == 0
    # content-addressed: nothing fetched again
    again = json.loads(run_cli("stage", server.url("sh"), cache, "--json").stdout)
    assert again["fetched"] == 0 and again["cached"] == len(tars) and again["folder"] == str(folder)


def test_stage_gives_up_in_one_line_keeps_what_is_whole_and_resumes(server, survey_shards, tmp_path, fast_retries):
    """A shard corrupt at every try: one line naming it, the other shards kept verified, no manifest (nothing
    reads a half-staged folder), no partial file; the next run fetches only that shard."""
    tars = sorted(_tars(survey_shards))
    server.faults[tars[1]] = ["flip"] * 3
    cache = tmp_path / "cache"
    res = run_cli("stage", server.url("sh"), cache, "--retries", 2, ok=False)
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert f"could not fetch {server.url('sh', '').rstrip('/')}/{tars[1]}?token=***" in line and "after 3 tries" in line
    assert TOKEN not in res.output
    store = cache / "sha256"
    sha = _tars(survey_shards)
    assert not (store / f"{sha[tars[1]]}.tar").exists() and not _partials(cache)
    assert not list(cache.glob("sh-*/manifest.json"))
    again = json.loads(run_cli("stage", server.url("sh"), cache, "--json").stdout)
    assert again["fetched"] == 1 and again["cached"] == len(tars) - 1


def test_stage_missing_shard_is_one_line_and_no_retry(server, survey_shards, tmp_path, fast_retries):
    tars = sorted(_tars(survey_shards))
    server.faults[tars[-1]] = ["404"] * 10
    res = run_cli("stage", server.url("sh"), tmp_path / "c", ok=False)
    line = res.output.strip().splitlines()[-1]
    assert res.exit_code == 1 and f"/{tars[-1]}?token=*** is missing (listed in" in line and "manifest.json" in line
    assert len([r for r in server.requests if tars[-1] in r]) == 1  # not retried
    res = run_cli("stage", server.url("nothing"), tmp_path / "c", ok=False)
    assert "is not a fastgal shard folder" in res.output and len(res.output.strip().splitlines()) == 1
    # a URL naming one of the folder's files (the user pasted a tar's link) says which folder to give
    res = run_cli("stage", server.url(f"sh/{tars[0]}"), tmp_path / "c", ok=False)
    assert res.output.strip().endswith("it names a file: give the folder that holds it, " + server.url("sh").split("?")[0].rstrip("/") + "/")


def test_stage_fetches_a_changed_shard_and_only_it(server, survey_shards, tmp_path):
    """The same URL serving a new version of one shard: that one fetched, the rest taken from the cache."""
    v2 = tmp_path / "v2"
    shutil.copytree(survey_shards, v2)
    m = json.loads((v2 / "manifest.json").read_text())
    e = m["shards"]["train"][0]
    with open(v2 / e["file"], "ab") as f:  # two more zero blocks: still the same samples, other bytes
        f.write(b"\0" * 1024)
    e["bytes"] += 1024
    e["sha256"] = hashlib.sha256((v2 / e["file"]).read_bytes()).hexdigest()
    (v2 / "manifest.json").write_text(json.dumps(m))
    cache = tmp_path / "cache"
    first = json.loads(run_cli("stage", server.url("sh"), cache, "--json").stdout)
    server.folders["sh"] = v2
    second = json.loads(run_cli("stage", server.url("sh"), cache, "--json").stdout)
    assert second["folder"] == first["folder"] and second["fetched"] == 1 and second["cached"] == first["shards"] - 1
    assert (Path(second["folder"]) / e["file"]).read_bytes() == (v2 / e["file"]).read_bytes()
    assert len(list((cache / "sha256").glob("*.tar"))) == first["shards"] + 1  # the old version is not deleted


def test_stage_refuses_up_front(server, tmp_path, monkeypatch):
    """Too little free space: one line with the bytes needed, nothing fetched; a folder of someone else's files
    in the way: refused, nothing deleted."""
    import fastgal.shards.stage as st

    real = shutil.disk_usage
    monkeypatch.setattr(st.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    res = run_cli("stage", server.url("sh"), tmp_path / "c", ok=False)
    assert "needs" in res.output and "bytes" in res.output and "has 0.00 GB free" in res.output
    assert not [r for r in server.requests if ".tar" in r]
    monkeypatch.setattr(st.shutil, "disk_usage", real)
    view = st.view_folder(tmp_path / "c", server.url("sh"))
    view.mkdir(parents=True)
    (view / "mine.txt").write_text("keep me")
    res = run_cli("stage", server.url("sh"), tmp_path / "c", ok=False)
    assert "did not write" in res.output and (view / "mine.txt").read_text() == "keep me"


def test_other_local_ranks_wait_with_a_line_saying_for_what(server, tmp_path, monkeypatch):
    """Under torchrun a process that is not LOCAL_RANK 0 waits for that one's staging; when it never comes the
    line names the URL, the folder and the marker it waited for."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("FASTGAL_STAGE_TIMEOUT", "1")
    monkeypatch.setenv("FASTGAL_CACHE", str(tmp_path / "c"))
    res = run_cli("info", server.url("sh"), ok=False)
    line = res.output.strip().splitlines()[-1]
    assert "LOCAL_RANK 1 waited 1s for LOCAL_RANK 0 to stage" in line and ".fastgal-stage.json" in line
    assert TOKEN not in res.output


def test_stage_from_s3_protocol_server(survey_shards, tmp_path, monkeypatch):
    """s3:// through s3fs against moto's standalone S3 server on 127.0.0.1; then `info` on the URL itself."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint, "FASTGAL_CACHE": str(tmp_path / "c")}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="galaxies")
        for p in survey_shards.iterdir():
            s3.upload_file(str(p), "galaxies", f"shards/v1/{p.name}")
        out = json.loads(run_cli("stage", "s3://galaxies/shards/v1/", "--json").stdout)
        assert out["fetched"] == len(_tars(survey_shards)) and Path(out["folder"]).parent == tmp_path / "c"
        res = run_cli("info", "s3://galaxies/shards/v1")  # staged (nothing fetched again), then checked whole
        assert "verified" in res.stdout
        import fastgal  # the Python API takes the URL too

        dls = fastgal.dataloaders("s3://galaxies/shards/v1/", bs=16, size=56, backend="torch")
        assert dls.shards.folder == Path(out["folder"]) and len(dls.valid.split) > 0
        assert run_cli("stage", "s3://galaxies/nothing/", ok=False).output.count("\n") == 1
    finally:
        srv.stop()


def test_resume_on_another_process_count_refuses_in_one_line(small_run, small_shards, tmp_path):
    """A run of 2 processes resumed by 1: refused in one line naming what changed and how to resume."""
    run = tmp_path / "r"
    run.mkdir()
    cfg = json.loads((small_run / "config.json").read_text())
    cfg["world_size"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    shutil.copy(small_run / "model.pt", run / "checkpoint.pth")  # present: what --resume looks for first
    args = [a for a in ("--epochs", 2, "--bs", 32, "--arch", "xresnet18", "--size", 56, "--tta", "--lr-find",
                        "--lr-find-iters", 6, "--workers", 1, "--quiet")]
    res = run_cli("train", small_shards, "--out", run, "--resume", *args, ok=False)
    line = res.output.strip().splitlines()[-1]
    assert res.exit_code == 1 and "2 processes" in line and "this resume has 1" in line and "global batch" in line
    assert os.environ.get("RANK") is None


# --------------------------------------------------------------------------- many nodes: the Slurm script

SBATCH = Path(__file__).resolve().parent.parent / "examples" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/bin/bash
# simulated srun: the command once per simulated node (SLURM_NNODES), each with its own node-local cache
while [[ "$1" == -* ]]; do shift; done
echo "srun $*" >> "$FAKE_SLURM_LOG"
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 FASTGAL_CACHE="$FAKE_NODES/node$i" "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
# simulated scontrol: `show hostnames` lists the simulated nodes (all this machine); everything is recorded
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done; fi
"""


def _fake_slurm(tmp_path: Path, nodes: int) -> dict:
    """PATH with a simulated srun and scontrol, and the environment Slurm gives a batch script."""
    import socket

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
            "FAKE_NODES": str(tmp_path / "nodes"), "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": f"n[0-{nodes - 1}]", "GPUS_PER_NODE": "1", "MASTER_PORT": str(port),
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node_two_processes(small_shards, ddp_run, tmp_path, monkeypatch):
    """examples/slurm/train.sbatch under a simulated Slurm (srun, scontrol on PATH): 2 nodes x 1 process, each
    node staging the shards over HTTP into its own cache, torchrun's c10d rendezvous on the first node; the run
    equals conftest's one-node, two-process run (ddp_run) to 1e-6."""
    import subprocess

    import pandas as pd
    from conftest import DDP_RUN

    srv = FaultServer()
    srv.folders["sh"] = small_shards
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        env = {**_fake_slurm(tmp_path, 2), "SHARDS": srv.url("sh"), "RUN": str(tmp_path / "run")}
        proc = subprocess.run(["bash", str(SBATCH), *map(str, DDP_RUN)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # predict on the URL too: staged into this process's own cache, the same predictions as the run's
        monkeypatch.setenv("FASTGAL_CACHE", str(tmp_path / "predict-cache"))
        res = run_cli("predict", tmp_path / "run", srv.url("sh"), "--out", tmp_path / "p.csv", "--workers", 1)
        assert TOKEN not in res.output
        import fastgal  # the API's predict takes the URL too (nothing fetched again: the same cache)

        api = fastgal.predict(str(tmp_path / "run"), srv.url("sh"), device="cpu")
    finally:
        srv.shutdown()
        srv.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "slurm.log").read_text()
    assert "-m fastgal stage http" in log and "scontrol show hostnames" in log and "--rdzv-backend c10d" in log
    assert "--nnodes 2 --nproc-per-node 1" in log and "--resume" not in log
    staged = [json.loads(p.read_text()) for p in sorted((tmp_path / "nodes").glob("node*/*/.fastgal-stage.json"))]
    assert len(staged) == 2 and staged[0]["manifest_sha256"] == staged[1]["manifest_sha256"]  # one cache per node
    run, one = tmp_path / "run", ddp_run.path
    a, b = json.loads((run / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text())
    assert a["world_size"] == b["world_size"] == 2 and a["steps_per_epoch"] == b["steps_per_epoch"]
    for k in ("rmse", "nmad", "bias", "r2", "tta_rmse", "baseline_rmse"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    pa, pb = pd.read_csv(run / "predictions_valid.csv"), pd.read_csv(one / "predictions_valid.csv")
    assert (pa.id == pb.id).all() and (pa.select_dtypes("number") - pb.select_dtypes("number")).abs().max().max() <= 1e-5
    pp = pd.read_csv(tmp_path / "p.csv")
    assert (pp.id == pa.id).all() and (pp.pred_metallicity - pa.pred_metallicity).abs().max() <= 1e-5
    assert abs(api.pred_metallicity.to_numpy() - pa.pred_metallicity.to_numpy()).max() <= 1e-4
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["shards_source"] == srv.url("sh").replace(TOKEN, "***") and cfg["shards_sha256"] == json.loads(
        (one / "config.json").read_text())["shards_sha256"]
    assert not any(TOKEN in p.read_text(errors="replace") for p in run.iterdir() if p.suffix in (".json", ".csv", ".html"))
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout


FAKE_PYTHON = """#!/bin/bash
# stands in for python: `-m fastgal stage` answers at once; torchrun is recorded and runs until it is stopped
echo "python $*" >> "$FAKE_SLURM_LOG"
if [ "$2" = "torch.distributed.run" ]; then
    trap 'kill "$s"; echo "torchrun got TERM" >> "$FAKE_SLURM_LOG"; exit 143' TERM
    sleep 60 & s=$!
    echo "torchrun ready" >> "$FAKE_SLURM_LOG"
    wait
fi
"""


def test_batch_script_resumes_and_requeues_itself(tmp_path):
    """The script's own logic, with python stood in for: a checkpoint in RUN adds --resume; USR1 (Slurm's
    --signal before the time limit) requeues the job and stops the step; a finished RUN is left alone."""
    import signal
    import subprocess

    env = _fake_slurm(tmp_path, 2)
    fake = tmp_path / "bin" / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"x")
    env.update(PYTHON=str(fake), SHARDS="s3://bucket/shards/", RUN=str(run))
    log = tmp_path / "slurm.log"
    p = subprocess.Popen(["bash", str(SBATCH), "--epochs", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and (not log.exists() or log.read_text().count("torchrun ready") < 2):
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()  # the script is at the training step (both fake torchruns wait)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    text = log.read_text()
    assert "train s3://bucket/shards/ --out " + str(run) + " --resume --epochs 3" in text
    assert "scontrol requeue 4242" in text and "torchrun got TERM" in text and "requeueing job 4242" in out
    assert p.returncode != 0
    (run / "metrics.json").write_text("{}")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "finished run" in done.stdout


def test_a_url_names_the_default_run_folder_without_its_token():
    from fastgal.run_folder import default_run_dir
    from fastgal.shards.stage import Redactor, redact

    d = default_run_dir(f"https://user:pa55word@host.example/shards/sdss/?X-Amz-Signature={TOKEN}&X-Amz-Expires=600")
    assert d.parent.name == "runs" and d.name.startswith("sdss-") and TOKEN not in str(d)
    assert redact(f"s3://bucket/x?sig={TOKEN}") == "s3://bucket/x?sig=***"
    assert Redactor("https://u:pa55word@h/x")("failed: https://u:pa55word@h/x/a.tar (pa55word)") == \
        "failed: https://***@h/x/a.tar (***)"


def test_ctrl_c_mid_transfer_leaves_no_partial_file_and_the_next_run_resumes(server, survey_shards, tmp_path):
    """Ctrl-C while a tar is half sent (the server stalls): the command stops at once (exit 130), not after the
    transfer's timeout; no partial file, no staged manifest; the next run fetches what is missing."""
    import signal
    import subprocess

    tars = sorted(_tars(survey_shards))
    server.faults[tars[0]] = ["stall"]
    server.stall = 20.0
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-m", "fastgal", "stage", server.url("sh"), str(cache), "--streams", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tars[0] in r for r in server.requests):
        time.sleep(0.05)
    time.sleep(0.5)  # half the tar on its way, then silence
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.time() - t0 < 10, err[-2000:]
    assert not _partials(cache) and not list(cache.glob("sh-*/manifest.json"))
    assert TOKEN not in err
    again = json.loads(run_cli("stage", server.url("sh"), cache, "--json").stdout)
    assert again["fetched"] + again["cached"] == len(tars) and again["fetched"] >= 1
