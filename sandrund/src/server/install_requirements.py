import ctypes, hashlib, json, os, re, signal, stat, subprocess, sys, urllib.parse
reqs, argv = sys.argv[1], sys.argv[2:]
base = "/tmp/.sandrun-req"
def put(name, text):
    with open(os.path.join(base, name), "w") as f:
        f.write(text)
def record(text):
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(3, data):]
    finally:
        os.close(3)
def fail(msg):
    sys.stderr.write("sandrun: requirements: " + msg + "\n")
    try:
        record("failed " + msg[:400].replace("\n", " ") + "\nend\n")
    except OSError:
        pass
    sys.exit(1)
def sha256_of(wheel):
    # The operator's file, from the read-only wheelhouse mount: a plain name, no link followed.
    if "/" in wheel or wheel.startswith(".") or not wheel.endswith(".whl"):
        fail("pip named a wheel that is not a file of the wheelhouse: " + repr(wheel))
    try:
        fd = os.open("/wheelhouse/" + wheel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                fail("wheel " + wheel + " of the wheelhouse is not a regular file")
            h = hashlib.sha256()
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return h.hexdigest()
                h.update(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        fail("wheel " + wheel + " of the wheelhouse cannot be read: " + str(e.strerror))
WORD = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")
VERSION = re.compile(r"[A-Za-z0-9._+!-]{1,200}\Z")
def attestable(name, version, wheel):
    # What the gateway accepts, checked here so that a record it would refuse fails the install
    # (reason requirements, before the command) rather than after the command ran.
    return (WORD.match(name) and VERSION.match(version) and VERSION.match(wheel)
            and wheel.endswith(".whl") and not wheel.startswith("."))
def nospace(text):
    return any(s in text for s in ("No space left on device", "[Errno 28]", "[Errno 27]",
                                   "File too large", "Disk quota exceeded"))
# Until fd 3 is closed no other process may reach it: non-dumpable, /proc/<this pid>/fd is
# root's, so nothing pip starts (a template's module runs inside pip) can reopen the pipe.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
    fail("cannot make the install step non-dumpable: errno " + str(ctypes.get_errno()))
try:
    os.mkdir(base, 0o700)
    put("requirements.txt", reqs)
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--no-index",
           "--find-links", "/wheelhouse", "--prefix", base + "/prefix", "--no-cache-dir",
           "--disable-pip-version-check", "--no-compile", "--no-warn-script-location",
           "--no-input", "--progress-bar", "off", "--report", base + "/report.json",
           "-r", base + "/requirements.txt"]
    penv = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": base, "TMPDIR": "/tmp",
            "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH") == "/env":
        penv["PYTHONPATH"] = "/env"
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, cwd=base, env=penv, close_fds=True)
except OSError as e:
    if e.errno in (27, 28):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    fail("could not run pip: " + str(e.strerror))
# Nothing pip started may outlive it into the hashing and the record: kill every process of the
# sandbox this one can signal (all but itself and the sandbox's init).
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
except OSError as e:
    fail("cannot end what pip left running: " + str(e.strerror))
out = p.stdout.decode("utf-8", "replace")
sys.stderr.write(out)
sys.stderr.flush()
if p.returncode != 0:
    m = re.search(r"No matching distribution found for (\S+)", out)
    h = re.search(r"^\s+(\S+) from file:", out, re.M)
    if nospace(out):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    if m:
        fail("the wheelhouse has no distribution for " + m.group(1))
    if "DO NOT MATCH THE HASHES" in out:
        fail("a wheel does not match its pinned hash: " + (h.group(1) if h else "see the log"))
    if "Hashes are required" in out:
        fail("when one requirement pins a --hash, every one must (pip's hash-checking mode)")
    if p.returncode < 0:
        fail("pip was killed by signal " + str(-p.returncode))
    fail("pip install failed with exit code " + str(p.returncode) + " (see the job's stderr)")
try:
    with open(base + "/report.json") as f:
        report = json.load(f)
    lines = []
    for item in report.get("install", []):
        md, url = item["metadata"], item["download_info"]["url"]
        if not url.startswith("file:///wheelhouse/"):
            fail(md["name"] + " did not come from the wheelhouse")
        wheel = urllib.parse.unquote(url[len("file:///wheelhouse/"):])
        if not attestable(md["name"], md["version"], wheel):
            fail("pip installed a distribution whose name, version or wheel cannot be reported: "
                 + repr((md["name"], md["version"], wheel))[:200])
        if len(lines) == 256:
            fail("more than 256 distributions installed")
        lines.append(md["name"] + " " + md["version"] + " " + wheel + " " + sha256_of(wheel)
                     + "\n")
    text = "installed\n" + "".join(lines) + "end\n"
    if len(text.encode("utf-8", "replace")) > 60000:
        fail("the list of installed distributions is longer than 60000 bytes")
except OSError as e:
    if e.errno in (27, 28):
        fail("the job's tmpfs is full (raise limits.tmpfs_mb)")
    fail("could not read pip's report: " + str(e.strerror))
site = None
for root, dirs, _ in os.walk(base + "/prefix"):
    for d in ("site-packages", "dist-packages"):
        if d in dirs:
            site = site or os.path.join(root, d)
env = dict(os.environ)
if site:
    env["PYTHONPATH"] = site + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
try:
    record(text)
except OSError as e:
    fail("could not report the install: " + str(e.strerror))
try:
    os.execve(argv[0], argv, env)
except OSError as e:
    sys.stderr.write("sandrun: cannot execute " + argv[0] + ": " + str(e.strerror) + "\n")
    sys.exit(127)
