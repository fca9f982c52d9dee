#!/usr/bin/env python3
"""The original Sandrun clients' requests, reproduced with python3-requests.

Written for sandrun's compatibility tests (tests/tests/compat_original.rs) from the requests
the original project's clients send and the fields they read: its Python client
(integrations/python-client), its MCP server (integrations/mcp-server, which uses httpx with the
same multipart shape) and its trusted-pool coordinator (integrations/trusted-pool, which uses
aiohttp). Each mode prints one JSON object with what the client saw; the Rust test asserts on it.

Usage: original_clients.py MODE BASE_URL [ARGS...]
  Certificates: requests' own `verify=` comes from $COMPAT_VERIFY when set, else requests reads
  REQUESTS_CA_BUNDLE like any requests program.
"""
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import requests

VERIFY = os.environ.get("COMPAT_VERIFY") or True


def session():
    s = requests.Session()
    if VERIFY is not True:
        # A session's `verify` loses to REQUESTS_CA_BUNDLE unless the environment is ignored.
        s.trust_env = False
        s.verify = VERIFY
    return s


def wait(s, base, job_id):
    # wait_for_completion: polls /status until completed or failed.
    deadline = time.time() + 120
    while time.time() < deadline:
        status = s.get(f"{base}/status/{job_id}").json()
        if status["status"] in ["completed", "failed"]:
            return status
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} never finished")


def tar_gz_of(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name=name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def python_client(base):
    s = session()
    out = {}
    # test_connection
    resp = s.get(base)
    out["test_connection"] = resp.json().get("service") == "sandrun"
    # submit_code: a tar.gz with main.py, manifest {entrypoint, interpreter}
    code = "print('hello from the python client')\n"
    files = {"files": ("job.tar.gz", tar_gz_of({"main.py": code.encode()}), "application/gzip")}
    data = {"manifest": json.dumps({"entrypoint": "main.py", "interpreter": "python3"})}
    resp = s.post(f"{base}/submit", files=files, data=data)
    resp.raise_for_status()
    job_id = resp.json()["job_id"]
    status = wait(s, base, job_id)
    out["quick_status"] = status["status"]
    logs = s.get(f"{base}/logs/{job_id}").json()
    out["quick_stdout"] = logs["stdout"]
    out["quick_files"] = s.get(f"{base}/outputs/{job_id}").json().get("files", [])
    # submit_directory: tar.add(directory, arcname='.'), manifest with args/outputs/limits
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "process.py"), "w") as f:
            f.write(
                "import sys, json\n"
                "json.dump({'args': sys.argv[1:]}, open('result.json', 'w'))\n"
                "print('processed', sys.argv[1:])\n"
            )
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(d, arcname=".")
        buf.seek(0)
        manifest = {
            "entrypoint": "process.py",
            "interpreter": "python3",
            "timeout": 300,
            "memory_mb": 512,
            "args": ["test-input"],
            "outputs": ["*.json"],
        }
        files = {"files": ("job.tar.gz", buf, "application/gzip")}
        resp = s.post(f"{base}/submit", files=files, data={"manifest": json.dumps(manifest)})
        resp.raise_for_status()
        dir_id = resp.json()["job_id"]
    status = wait(s, base, dir_id)
    out["dir_status"] = status["status"]
    out["dir_stdout"] = s.get(f"{base}/logs/{dir_id}").json()["stdout"]
    listed = s.get(f"{base}/outputs/{dir_id}").json().get("files", [])
    out["dir_files"] = [f["name"] for f in listed]
    # download_file
    resp = s.get(f"{base}/download/{dir_id}/result.json")
    resp.raise_for_status()
    out["downloaded"] = json.loads(resp.content)
    # stats and environments, as the original's CLI and admin console read them
    out["your_quota"] = s.get(f"{base}/stats").json()["your_quota"]
    out["templates"] = s.get(f"{base}/environments").json()["templates"]
    return out


def mcp(base):
    # The MCP server's upload: a legacy body with Size counted in characters, sent as the
    # `files` part (no content type), and a manifest form field.
    s = session()
    code = "print('héllo wörld ✓ — naïve café')\nprint(len('日本語'))\n"
    fake_tar = f"----Tar\nPath: main.py\nSize: {len(code)}\n\n{code}"
    resp = s.post(
        f"{base}/submit",
        files={"files": ("job.tar.gz", fake_tar)},
        data={"manifest": json.dumps({"entrypoint": "main.py", "interpreter": "python3",
                                      "timeout": 30})},
    )
    out = {"submit_status": resp.status_code, "submit": resp.json()}
    if resp.status_code != 200:
        return out
    job_id = resp.json()["job_id"]
    status = wait(s, base, job_id)
    logs = s.get(f"{base}/logs/{job_id}").json()
    out.update({
        "status": status["status"],
        "stdout": logs.get("stdout", ""),
        "stderr": logs.get("stderr", ""),
        "cpu_seconds": status.get("metrics", {}).get("cpu_seconds"),
    })
    return out


def coordinator(bases, worker_ids):
    # The trusted-pool coordinator: one client trusting every worker's certificate at once
    # (COMPAT_VERIFY is a bundle of them), /health must name the configured worker_id, then
    # submit a project and fetch its status and an output.
    s = session()
    out = {"health": [], "jobs": []}
    for base, wid in zip(bases, worker_ids):
        resp = s.get(f"{base}/health", timeout=5)
        data = resp.json()
        out["health"].append({"status": resp.status_code, "matches": data.get("worker_id") == wid,
                              "value": data.get("status")})
    for base in bases:
        files = tar_gz_of({"main.py": b"open('out.txt','w').write('pool')\nprint('pool job')\n"})
        manifest = {"entrypoint": "main.py", "interpreter": "python3", "outputs": ["out.txt"]}
        resp = s.post(
            f"{base}/submit",
            files=[("files", ("project.tar.gz", files, "application/gzip")),
                   ("manifest", (None, json.dumps(manifest), "application/json"))],
            timeout=30,
        )
        job = {"submit_status": resp.status_code}
        if resp.status_code == 200:
            job_id = resp.json()["job_id"]
            job["status"] = wait(s, base, job_id)["status"]
            got = s.get(f"{base}/outputs/{job_id}/out.txt", timeout=60)
            job["output_status"] = got.status_code
            job["output"] = got.text
        out["jobs"].append(job)
    return out


def main():
    mode, base = sys.argv[1], sys.argv[2]
    if mode == "python-client":
        result = python_client(base)
    elif mode == "mcp":
        result = mcp(base)
    elif mode == "coordinator":
        result = coordinator(base.split(","), sys.argv[3].split(","))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
