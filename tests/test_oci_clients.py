"""uvmshim as an OCI runtime on real UVMs: its runc command line, podman and containerd (#6).

Each test boots one or two UVMs through the runtime's shim and checks afterwards that nothing
of them is left: no VM directory named ``oci-*``, no state directory. podman and containerd
tests run when the Debian packages are installed (``.ci/run`` installs them) and apply the
host fixes of ``docs/oci-runtime.md`` (podman) themselves: a v1 ``hugetlb`` mount (crun refuses a
hybrid cgroup layout otherwise; undone afterwards) and ulimits within the hard limits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uvmshim import procscan
from uvmshim.runtime.leaks import find_holdings

from helpers import busybox_rootfs, podman_host_fixes, uvmshim_binary

pytestmark = pytest.mark.vm

APPLETS = ["sh", "echo", "cat", "sleep", "true", "ls"]
#: /etc/passwd and /etc/group with root alone.
ETC_FILES = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n"}
LOOP = "trap 'exit 0' TERM; while :; do sleep 1; done"


def make_rootfs(path: Path) -> Path:
    return busybox_rootfs(path, dirs=("bin", "proc", "sys", "dev", "etc", "tmp"),
                          applets=APPLETS, files=ETC_FILES)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("oci") / "rootfs")


def our_vms() -> list[str]:
    return [str(v.state_dir) for v in find_holdings().vms if v.state_dir.name.startswith("oci-")]


def _someone_elses(vm: str, mine: str) -> bool:
    """Whether the live QEMU of ``vm`` was started by a process that is not about ``mine``
    (a path of this test): other tests may boot runtime VMs at the same time."""
    for v in find_holdings().vms:
        if str(v.state_dir) == vm and v.live_pid:
            pid = v.live_pid
            while pid > 1:
                try:
                    if mine in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                            errors="replace"):
                        return False
                    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    break
            return True
    return False


@pytest.fixture(autouse=True)
def no_vm_left(tmp_path: Path) -> Iterator[None]:
    before = set(our_vms())
    yield
    deadline = time.monotonic() + 30  # a shim may still be tearing its VM down
    while set(our_vms()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {vm for vm in set(our_vms()) - before if not _someone_elses(vm, str(tmp_path))}
    assert left == set()


def make_bundle(tmp: Path, rootfs: Path, args: list[str]) -> Path:
    b = tmp / "bundle"
    b.mkdir(parents=True)
    subprocess.run([uvmshim_binary(), "spec", "--bundle", str(b)], check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["process"]["args"] = args
    (b / "config.json").write_text(json.dumps(spec))
    return b


class Runc:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *argv: str, check: bool = True, stdin: int | None = None,
                 output: int | None = None) -> subprocess.CompletedProcess[str]:
        pipe = subprocess.PIPE if output is None else output
        res = subprocess.run([uvmshim_binary(), "--root", str(self.root), *argv], stdin=stdin,
                             stdout=pipe, stderr=pipe, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv}: rc={res.returncode} {res.stderr}")
        return res

    def status(self, cid: str) -> str:
        return str(json.loads(self("state", cid).stdout)["status"])


def wait_for(pred: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_runc_lifecycle_and_bad_calls(tmp_path: Path, rootfs: Path) -> None:
    runc = Runc(tmp_path / "root")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", f"echo started; {LOOP}"])
    out = tmp_path / "out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1",
             stdin=subprocess.DEVNULL, output=f.fileno())
    shim = int((tmp_path / "pid").read_text())
    assert runc.status("c1") == "created"
    res = runc("create", "--bundle", str(b), "c1", check=False)
    assert res.returncode == 1 and "container with id exists" in res.stderr
    runc("start", "c1")
    res = runc("start", "c1", check=False)
    assert res.returncode == 1 and "already running" in res.stderr
    assert runc.status("c1") == "running"
    res = runc("exec", "c1", "sh", "-c", "echo exec-out; exit 4", check=False)
    assert (res.returncode, res.stdout) == (4, "exec-out\n")
    assert json.loads(runc("ps", "--format", "json", "c1").stdout)
    runc("pause", "c1")
    assert runc.status("c1") == "paused"
    runc("resume", "c1")
    res = runc("delete", "c1", check=False)
    assert res.returncode == 1 and "not stopped" in res.stderr
    runc("kill", "c1", "TERM")
    wait_for(lambda: runc.status("c1") == "stopped")
    assert json.loads((runc.root / "containers" / "c1" / "state.json").read_text())[
        "exit_code"] == 0
    res = runc("kill", "c1", "9", check=False)
    assert res.returncode == 1 and "container not running" in res.stderr
    runc("delete", "c1")
    assert not (runc.root / "containers" / "c1").exists()
    assert b"started" in out.read_bytes()
    assert procscan.start_time(shim) is None  # exited (a zombie if its new parent does not reap)


def host_crun_create_error(tmp: Path, bundle: Path) -> tuple[int, str]:
    """crun's own answer to ``create`` of ``bundle`` on this host (cgroups disabled: the
    host's hybrid layout is not the point), cleaned up afterwards."""
    crun = shutil.which("crun")
    if crun is None:
        pytest.skip("crun is not installed")
    root = tmp / "crun-root"
    argv = [crun, "--root", str(root), "--cgroup-manager=disabled"]
    res = subprocess.run([*argv, "create", "--bundle", str(bundle), "cmp"],
                         capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    subprocess.run([*argv, "delete", "--force", "cmp"], capture_output=True, check=False)
    return res.returncode, res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""


@pytest.mark.parametrize(("change", "message"), [
    ({"rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]}, "invalid rlimit"),
    ({"args": ["/no/such/binary"]}, "/no/such/binary"),
])
def test_create_fails_like_crun_and_leaves_nothing(tmp_path: Path, rootfs: Path,
                                                   change: dict[str, object],
                                                   message: str) -> None:
    """Two phases: the guest's ``crun create`` runs at ``create``, so a spec crun refuses fails
    ``create`` (exit 1, crun's error line), and nothing is left: no state, no VM."""
    runc = Runc(tmp_path / "root")
    b = make_bundle(tmp_path, rootfs, ["true"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"].update(change)
    (b / "config.json").write_text(json.dumps(spec))
    res = runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "bad",
               check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert not (runc.root / "containers" / "bad").exists()
    assert not (tmp_path / "pid").exists()
    code, line = host_crun_create_error(tmp_path, b)
    assert code == 1 and message in line
    assert line in res.stderr  # the same error line as crun's


def test_created_container_waits_and_deletes_like_runc(tmp_path: Path, rootfs: Path) -> None:
    """After ``create`` the init exists but has not run; ``delete`` (no ``--force``) of a
    created container removes it, as runc's does; ``kill`` of a stopped one fails."""
    runc = Runc(tmp_path / "root")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "echo ran; exit 5"])
    out = tmp_path / "out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1",
             stdin=subprocess.DEVNULL, output=f.fileno())
    st = json.loads(runc("state", "c1").stdout)
    assert st["status"] == "created" and st["pid"] == int((tmp_path / "pid").read_text())
    assert set(st) >= {"ociVersion", "id", "status", "pid", "bundle"}
    pids = json.loads(runc("ps", "--format", "json", "c1").stdout)
    assert isinstance(pids, list)
    time.sleep(1)
    assert out.read_bytes() == b""  # created: the process has not run
    runc("delete", "c1")
    assert not (runc.root / "containers" / "c1").exists()
    assert out.read_bytes() == b""

    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "c2", stdin=subprocess.DEVNULL, output=f.fileno())
    runc("start", "c2")
    wait_for(lambda: runc.status("c2") == "stopped")
    assert json.loads((runc.root / "containers" / "c2" / "state.json").read_text())[
        "exit_code"] == 5
    assert out.read_bytes() == b"ran\n"
    res = runc("kill", "c2", "KILL", check=False)
    assert res.returncode == 1 and "container not running" in res.stderr
    res = runc("start", "c2", check=False)
    assert res.returncode == 1 and "stopped" in res.stderr
    runc("delete", "c2")


def test_namespace_paths_join_the_other_containers_uvm(tmp_path: Path, rootfs: Path) -> None:
    """podman pods: members get the infra container's ``/proc/<pid>/ns/*`` paths; they join
    its UVM and those namespaces in the guest (same hostname, same pid namespace)."""
    runc = Runc(tmp_path / "root")
    infra = make_bundle(tmp_path / "infra", rootfs, ["sh", "-c", LOOP])
    spec = json.loads((infra / "config.json").read_text())
    spec["hostname"] = "podhost"
    (infra / "config.json").write_text(json.dumps(spec))
    runc("create", "--bundle", str(infra), "--pid-file", str(tmp_path / "ipid"), "infra",
         stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
    runc("start", "infra")
    vms = our_vms()
    pid = int((tmp_path / "ipid").read_text())
    m = make_bundle(tmp_path / "m", rootfs, ["sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'"])
    spec = json.loads((m / "config.json").read_text())
    spec.pop("hostname", None)
    spec["linux"]["namespaces"] = [
        {"type": t, "path": f"/proc/{pid}/ns/{f}"} if f else {"type": t}
        for t, f in (("pid", "pid"), ("ipc", "ipc"), ("uts", "uts"), ("mount", ""))]
    (m / "config.json").write_text(json.dumps(spec))
    out = tmp_path / "m.out"
    try:
        for cid in ("m1", "m2"):
            with open(out, "wb") as f:
                runc("create", "--bundle", str(m), cid, stdin=subprocess.DEVNULL,
                     output=f.fileno())
            assert our_vms() == vms  # no new UVM
            runc("start", cid)
            wait_for(lambda c=cid: runc.status(c) == "stopped")  # type: ignore[misc]
            lines = out.read_text().split()
            assert lines[0] == "podhost" and int(lines[1]) >= 2  # infra's processes too
            runc("delete", cid)
    finally:
        runc("delete", "--force", "infra")


def test_killed_shim_and_caller_killed_mid_create(tmp_path: Path, rootfs: Path) -> None:
    runc = Runc(tmp_path / "root")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", LOOP])
    # The shim keeps create's stdio (the container's): no pipes that run() would wait on.
    runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "k1",
         stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
    runc("start", "k1")
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
    wait_for(lambda: runc.status("k1") == "stopped")
    runc("delete", "--force", "k1")
    assert not (runc.root / "containers" / "k1").exists()

    # The caller of create is killed while the UVM boots: the shim finds nobody to report
    # to, and removes everything.
    proc = subprocess.Popen([uvmshim_binary(), "--root", str(runc.root), "create",
                             "--bundle", str(b), "k2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (runc.root / "containers" / "k2" / "state.json").exists(), 30)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    wait_for(lambda: not (runc.root / "containers" / "k2").exists(), 120)


# Real clients -----------------------------------------------------------------------------

def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install podman containerd)")


@pytest.fixture(scope="module")
def sandbox_fixes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The two host fixes of docs/oci-runtime.md (podman), undone afterwards where we made them."""
    with podman_host_fixes(tmp_path_factory.mktemp("podman")) as env:
        yield env


def podman(env: dict[str, str], *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", "--runtime", uvmshim_binary(), *argv], env=env,
                         capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {argv}: rc={res.returncode} {res.stderr}")
    return res


def test_podman(tmp_path: Path, rootfs: Path, sandbox_fixes: dict[str, str]) -> None:
    _need("podman", "conmon")
    env = sandbox_fixes
    res = podman(env, "run", "--rm", "--network=none", "--rootfs", str(rootfs), "/bin/echo", "hi")
    assert res.stdout == "hi\n"
    name = f"uvmshim-test-{os.getpid()}"
    podman(env, "run", "-d", "--name", name, "--network=none", "--rootfs", str(rootfs),
           "sh", "-c", LOOP)
    try:
        res = podman(env, "exec", name, "sh", "-c", "echo in-exec; exit 3", check=False)
        assert (res.returncode, res.stdout) == (3, "in-exec\n")
        podman(env, "stop", "-t", "10", name)
        assert "Exited (0)" in podman(env, "ps", "-a", "--filter", f"name={name}").stdout
    finally:
        podman(env, "rm", "-f", name, check=False)
    image = f"localhost/uvmshim-test-bb:{os.getpid()}"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tmp_path / "bb.tar"), "."], check=True)
    podman(env, "import", "-q", str(tmp_path / "bb.tar"), image)
    try:
        res = podman(env, "run", "--rm", "--network=none", image, "sh", "-c",
                     "echo from-image; exit 2", check=False)
        assert (res.returncode, res.stdout) == (2, "from-image\n")
    finally:
        podman(env, "rmi", "-f", image, check=False)
    assert not [p for p in Path("/run/uvmshim/containers").glob("*")
                if (p / "state.json").exists() and
                json.loads((p / "state.json").read_text())["bundle"].find(name) >= 0]


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[list[str]]:
    _need("containerd", "ctr", "containerd-shim-runc-v2")
    d = tmp_path / "ctrd"
    d.mkdir()
    sock = d / "containerd.sock"
    (d / "config.toml").write_text(
        f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  address = ""\n[metrics]\n  address = ""\n')
    log = open(d / "containerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")],
                            stdout=log, stderr=log)
    try:
        wait_for(sock.exists, 30)
        yield ["ctr", "-a", str(sock)]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        subprocess.run(["umount", "-R", str(d)], check=False, capture_output=True)


def test_containerd(containerd: list[str], rootfs: Path) -> None:
    ctr = containerd
    binary = ["--runc-binary", uvmshim_binary()]

    def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*ctr, *argv], capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"ctr {argv}: rc={res.returncode} {res.stderr}")
        return res

    res = run("run", "--rm", *binary, "--rootfs", str(rootfs), "t1", "/bin/echo", "hi")
    assert res.stdout == "hi\n"
    run("run", "-d", *binary, "--rootfs", str(rootfs), "t2", "sh", "-c", LOOP)
    try:
        res = run("task", "exec", "--exec-id", "e1", "t2", "sh", "-c", "echo ex; exit 6",
                  check=False)
        assert (res.returncode, res.stdout) == (6, "ex\n")
        assert "RUNNING" in run("task", "ls").stdout
        run("task", "kill", "t2")
        wait_for(lambda: "STOPPED" in run("task", "ls").stdout)
    finally:
        run("task", "rm", "-f", "t2", check=False)
        run("container", "rm", "t2", check=False)


def test_pod_member_joins_the_sandbox_uvm(tmp_path: Path, rootfs: Path) -> None:
    """CRI annotations: the workload container runs in the sandbox's UVM (one VM for both)."""
    runc = Runc(tmp_path / "root")
    shared = {"destination": "/shared", "type": "bind", "source": "sandbox:///shared",
              "options": ["rbind"]}
    sb = make_bundle(tmp_path / "sb", rootfs, ["sh", "-c", LOOP])
    w = make_bundle(tmp_path / "w", rootfs, ["sh", "-c", "cat /shared/f; exit 9"])
    for b, kind in ((sb, "sandbox"), (w, "container")):
        spec = json.loads((b / "config.json").read_text())
        spec["annotations"] = {"io.kubernetes.cri.container-type": kind,
                               "io.kubernetes.cri.sandbox-id": "pod1"}
        spec["mounts"].append(shared)
        (b / "config.json").write_text(json.dumps(spec))
    res = runc("create", "--bundle", str(w), "lonely", check=False)
    assert res.returncode == 1 and "pod sandbox pod1 does not exist" in res.stderr
    runc("create", "--bundle", str(sb), "pod1", stdin=subprocess.DEVNULL,
         output=subprocess.DEVNULL)
    runc("start", "pod1")
    runc("exec", "pod1", "sh", "-c", "echo from-sandbox > /shared/f")
    vms = our_vms()
    out = tmp_path / "w.out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(w), "--pid-file", str(tmp_path / "wpid"), "w1",
             stdin=subprocess.DEVNULL, output=f.fileno())
    assert our_vms() == vms  # no new UVM
    runc("start", "w1")
    wait_for(lambda: runc.status("w1") == "stopped")
    assert out.read_text() == "from-sandbox\n"
    assert json.loads((runc.root / "containers" / "w1" / "state.json").read_text())[
        "exit_code"] == 9
    runc("delete", "w1")
    runc("delete", "--force", "pod1")
    assert not list((runc.root / "containers").iterdir())


def test_podman_pod_runs_in_one_uvm(tmp_path: Path, rootfs: Path,
                                    sandbox_fixes: dict[str, str]) -> None:
    """``podman pod create`` + 3 members: the infra container's namespace paths make every
    member join its UVM (one VM for the pod) and its UTS/IPC namespaces in the guest."""
    _need("podman", "conmon", "catatonit")
    env = sandbox_fixes
    pod = f"uvmshim-pod-{os.getpid()}"
    vms = set(our_vms())
    podman(env, "pod", "create", "--name", pod, "--network=none", "--hostname", "podhost")
    try:
        names = [f"{pod}-m{i}" for i in range(3)]
        for name in names:
            podman(env, "run", "-d", "--pod", pod, "--name", name, "--rootfs", str(rootfs),
                   "sh", "-c", f"echo {name} > /dev/shm/{name}; {LOOP}")
        assert len(set(our_vms()) - vms) == 1  # the infra container's UVM, and only it
        for name in names:
            res = podman(env, "exec", name, "sh", "-c", "hostname; ls /dev/shm")
            lines = res.stdout.split()
            assert lines[0] == "podhost" and set(names) <= set(lines[1:]), res.stdout
        podman(env, "stop", "-t", "10", names[0])
        assert "Exited (0)" in podman(env, "ps", "-a", "--filter", f"name={names[0]}").stdout
        assert podman(env, "exec", names[1], "true").returncode == 0  # the pod lives on
    finally:
        podman(env, "pod", "rm", "-f", "-t", "10", pod, check=False)


def test_hooks_get_the_state_in_order(tmp_path: Path) -> None:
    """Host hooks (prestart, createRuntime at create; poststart at start; poststop at delete)
    get the OCI state on stdin; createContainer/startContainer run in the guest, in the
    container (their paths in its root); a failing createRuntime fails create."""
    rootfs = make_rootfs(tmp_path / "rootfs")  # the guest hooks write into it
    runc = Runc(tmp_path / "root")
    d = tmp_path / "hooks"
    d.mkdir()

    def host(name: str) -> dict[str, object]:
        return {"path": "/bin/sh", "args": ["sh", "-c", f'cat > {d}/{name}.json; '
                                                         f'echo "$WHO" >> {d}/order'],
                "env": [f"WHO={name}"], "timeout": 30}

    # createContainer runs before pivot_root: it finds the root through the state's bundle
    to_root = ('s=$(cat); b=${s#*\\"bundle\\":\\"}; b=${b%%\\"*}; '
               'echo "$s" > "$b/rootfs/cc.json"')
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "cat /cc.json; echo; cat /sc.json"])
    spec = json.loads((b / "config.json").read_text())
    spec["hooks"] = {name: [host(name)] for name in
                     ("prestart", "createRuntime", "poststart", "poststop")}
    spec["hooks"]["createContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", to_root]}]
    spec["hooks"]["startContainer"] = [{"path": "/bin/sh",
                                        "args": ["sh", "-c", "cat > /sc.json"]}]
    spec["annotations"] = {"k": "v"}
    (b / "config.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "h1",
             stdin=subprocess.DEVNULL, output=f.fileno())
    pid = int((tmp_path / "pid").read_text())
    assert (d / "order").read_text() == "prestart\ncreateRuntime\n"
    st = json.loads((d / "createRuntime.json").read_text())
    assert st == {"ociVersion": st["ociVersion"], "id": "h1", "status": "creating", "pid": pid,
                  "bundle": str(b), "annotations": {"k": "v"}}
    runc("start", "h1")
    assert json.loads((d / "poststart.json").read_text())["status"] == "running"
    wait_for(lambda: runc.status("h1") == "stopped")
    guest = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    # crun's state, in the guest (crun says "starting" for startContainer)
    assert [g["status"] for g in guest] == ["created", "starting"]
    assert all(g["id"] == "h1" for g in guest)
    runc("delete", "h1")
    assert (d / "order").read_text().split() == ["prestart", "createRuntime", "poststart",
                                                  "poststop"]
    assert json.loads((d / "poststop.json").read_text())["status"] == "stopped"

    spec["hooks"] = {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 7"]}]}
    (b / "config.json").write_text(json.dumps(spec))
    res = runc("create", "--bundle", str(b), "h2", check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "createRuntime hook #0" in res.stderr and \
        "exit status 7" in res.stderr, res.stderr
    assert not (runc.root / "containers" / "h2").exists()
    spec["hooks"] = {"startContainer": [{"path": "/no/such/hook"}]}
    (b / "config.json").write_text(json.dumps(spec))
    res = runc("create", "--bundle", str(b), "h3", check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "/no/such/hook does not exist in the container's root" \
        in res.stderr, res.stderr


def test_pids_limit_applies_in_the_guest(tmp_path: Path, rootfs: Path) -> None:
    """``linux.resources`` reach the guest's crun (hcsshim drops pids): a fork bomb stops
    at ``pids.limit``."""
    runc = Runc(tmp_path / "root")
    bomb = ("i=0; while [ $i -lt 60 ]; do sleep 20 & i=$((i+1)); done; "
            "exit 0")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", bomb])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"].setdefault("resources", {})["pids"] = {"limit": 16}
    (b / "config.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        runc("create", "--bundle", str(b), "p1", stdin=subprocess.DEVNULL, output=f.fileno())
    runc("start", "p1")
    wait_for(lambda: runc.status("p1") == "stopped", 120)
    runc("delete", "p1")
    text = out.read_text()
    assert "can't fork" in text or "Resource temporarily unavailable" in text, text


def test_shim_and_qemu_in_the_containers_host_cgroup(tmp_path: Path, rootfs: Path) -> None:
    """``linux.cgroupsPath`` on the host: the shim and its QEMU are in it, bounded by the
    UVM's size (memory limit + overheads; CPU quota + the UVM's share); ``delete`` removes it."""
    from uvmshim.runc.cgroups import hierarchies
    from uvmshim.uvm.sizing import HOST_OVERHEAD_MB

    runc = Runc(tmp_path / "root")
    parent = f"uvmshim-test-{os.getpid()}"
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", LOOP])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["cgroupsPath"] = f"/{parent}/c1"
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20},
                                  "cpu": {"quota": 50000, "period": 100000}}
    (b / "config.json").write_text(json.dumps(spec))
    roots = hierarchies()
    try:
        runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1",
             stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
        shim = int((tmp_path / "pid").read_text())
        for root in roots:
            procs = [int(p) for p in (root / parent / "c1" / "cgroup.procs").read_text().split()]
            assert shim in procs
            assert any(b"qemu" in Path(f"/proc/{p}/cmdline").read_bytes() for p in procs
                       if p != shim)
        mem = roots[0] / parent / "c1"
        if (mem / "memory.limit_in_bytes").exists():  # v1
            limit = int((mem / "memory.limit_in_bytes").read_text())
            assert int((roots[0].parent / "cpu" / parent / "c1" / "cpu.cfs_quota_us")
                       .read_text()) == 100000
        else:
            limit = int((mem / "memory.max").read_text())
            assert (mem / "cpu.max").read_text().split() == ["100000", "100000"]
        assert limit == (512 + HOST_OVERHEAD_MB) << 20  # 64 MiB + guest overhead → 512 class
        runc("start", "c1")
        assert runc("exec", "c1", "true").returncode == 0
        runc("kill", "c1", "KILL")
        wait_for(lambda: runc.status("c1") == "stopped")
        runc("delete", "c1")
        assert not any((root / parent / "c1").exists() for root in roots)
    finally:
        runc("delete", "--force", "c1", check=False)
        for root in roots:
            with contextlib.suppress(OSError):
                (root / parent).rmdir()


def _host_bounds(roots: list[Path], rel: str) -> tuple[str, str]:
    """The memory and CPU bounds of the host cgroup ``rel`` (as v2 writes them)."""
    d = roots[0] / rel
    if (d / "memory.limit_in_bytes").exists():  # v1: -1 reads back as a page-rounded maximum
        memory = (d / "memory.limit_in_bytes").read_text().strip()
        cpu = roots[0].parent / "cpu" / rel
        quota = (cpu / "cpu.cfs_quota_us").read_text().strip()
        period = (cpu / "cpu.cfs_period_us").read_text().strip()
        return ("max" if int(memory) >= 1 << 62 else memory,
                f"{'max' if quota == '-1' else quota} {period}")
    return (d / "memory.max").read_text().strip(), (d / "cpu.max").read_text().strip()


def test_update_bounds_the_host_cgroup_and_events_report_stats(tmp_path: Path,
                                                              rootfs: Path) -> None:
    """``update`` sets the limits in the guest and the UVM's bounds in the host cgroup (memory:
    the UVM's RAM + QEMU's overhead once there is a limit; CPU: the quota + half a period); a
    limit the UVM cannot hold is refused. ``events --stats`` (and the stream) give runc's
    stats from the guest's cgroup; a stopped container fails as with runc."""
    from uvmshim.runc.cgroups import hierarchies
    from uvmshim.uvm.sizing import HOST_OVERHEAD_MB

    runc = Runc(tmp_path / "root")
    parent = f"uvmshim-test-upd-{os.getpid()}"
    rel = f"{parent}/u1"
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", LOOP])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["cgroupsPath"] = f"/{rel}"
    # No memory limit at create: the UVM has its default 512 MiB and no host memory bound.
    spec["linux"]["resources"] = {"cpu": {"quota": 50000, "period": 100000}}
    (b / "config.json").write_text(json.dumps(spec))
    roots = hierarchies()
    try:
        runc("create", "--bundle", str(b), "u1", stdin=subprocess.DEVNULL,
             output=subprocess.DEVNULL)
        assert _host_bounds(roots, rel) == ("max", "100000 100000")
        runc("start", "u1")

        runc("update", "--memory", "128m", "--cpu-quota", "150000", "--pids-limit", "25", "u1")
        res = runc("exec", "u1", "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max",
                   "/sys/fs/cgroup/pids.max")
        assert res.stdout.split() == [str(128 << 20), "150000", "100000", "25"], res.stdout
        assert _host_bounds(roots, rel) == (str((512 + HOST_OVERHEAD_MB) << 20),
                                            "200000 100000")

        event = json.loads(runc("events", "--stats", "u1").stdout)
        assert (event["type"], event["id"]) == ("stats", "u1")
        data = event["data"]
        assert data["pids"]["current"] >= 1 and data["pids"]["limit"] == 25, data["pids"]
        assert data["memory"]["usage"]["usage"] > 0, data["memory"]
        assert data["memory"]["usage"]["limit"] == 128 << 20
        assert data["memory"]["raw"]["anon"] >= 0
        assert data["cpu"]["usage"]["total"] > 0, data["cpu"]

        # More than the UVM holds (512 MiB, 256 of them the guest's own): refused, unchanged
        res = runc("update", "--memory", "300m", "u1", check=False)
        assert res.returncode == 1 and "does not fit the utility VM" in res.stderr, res.stderr
        res = runc("exec", "u1", "cat", "/sys/fs/cgroup/memory.max")
        assert res.stdout.split() == [str(128 << 20)]
        # No limits: no bounds
        runc("update", "--memory", "-1", "--cpu-quota", "-1", "u1")
        res = runc("exec", "u1", "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max")
        assert res.stdout.split() == ["max", "max", "100000"], res.stdout
        assert _host_bounds(roots, rel) == ("max", "max 100000")

        stream = subprocess.Popen([uvmshim_binary(), "--root", str(runc.root), "events",
                                   "--interval", "500ms", "u1"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert stream.stdout is not None
            lines = [json.loads(stream.stdout.readline()) for _ in range(2)]
            assert [e["type"] for e in lines] == ["stats", "stats"]
            assert lines[1]["data"]["cpu"]["usage"]["total"] >= \
                lines[0]["data"]["cpu"]["usage"]["total"]
            runc("kill", "u1", "KILL")
            assert stream.wait(timeout=120) == 0  # ends with the container
        finally:
            if stream.poll() is None:
                stream.kill()
                stream.wait()
        wait_for(lambda: runc.status("u1") == "stopped")
        res = runc("events", "--stats", "u1", check=False)
        assert res.returncode == 1 and "container with id u1 is not running" in res.stderr
        runc("delete", "u1")
    finally:
        runc("delete", "--force", "u1", check=False)
        for root in roots:
            with contextlib.suppress(OSError):
                (root / parent).rmdir()


def test_state_agrees_with_crun_and_exec_flags_apply(tmp_path: Path, rootfs: Path) -> None:
    """``state`` of a created container gives the OCI state crun gives for the same bundle;
    ``exec`` with runc's flags (cwd, env, user, groups, caps, no-new-privs) runs as asked;
    ``update`` (flags or ``-r``) changes the container's cgroup in the guest."""
    crun = shutil.which("crun")
    if crun is None:
        pytest.skip("crun is not installed")
    runc = Runc(tmp_path / "root")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", LOOP])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {"org.example.k": "v"}
    (b / "config.json").write_text(json.dumps(spec))
    croot = tmp_path / "crun-root"
    cargv = [crun, "--root", str(croot), "--cgroup-manager=disabled"]
    try:
        subprocess.run([*cargv, "create", "--bundle", str(b), "s1"], check=True, timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs = json.loads(subprocess.run([*cargv, "state", "s1"], check=True,
                                           capture_output=True, text=True).stdout)
    finally:
        subprocess.run([*cargv, "delete", "--force", "s1"], capture_output=True, check=False)
    runc("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "s1",
         stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
    try:
        ours = json.loads(runc("state", "s1").stdout)
        assert set(ours) >= set(theirs) - {"systemd-scope"}, (ours, theirs)
        # ociVersion differs by design: crun writes its own state version (1.0.0), runc and
        # uvmshim the spec version they implement
        for key in ("id", "status", "bundle", "rootfs", "annotations"):
            assert ours.get(key) == theirs.get(key), (key, ours, theirs)
        assert ours["pid"] == int((tmp_path / "pid").read_text()) and theirs["pid"] > 0
        runc("start", "s1")
        res = runc("exec", "--cwd", "/tmp", "-e", "X=yes", "-u", "5:6", "-g", "7",
                   "--cap", "CAP_NET_ADMIN", "--no-new-privs", "s1", "sh", "-c",
                   "echo $X; pwd; cat /proc/self/status")
        lines = res.stdout.splitlines()
        assert lines[:2] == ["yes", "/tmp"], res.stdout
        status = dict(line.split(":", 1) for line in lines[2:] if ":" in line)
        assert status["Uid"].split()[0] == "5" and status["Gid"].split()[0] == "6"
        assert status["Groups"].split() == ["7"]
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["CapBnd"], 16) & (1 << 12)  # CAP_NET_ADMIN
        res = runc("exec", "s1", "sh", "-c", "cat /proc/self/status")
        assert "NoNewPrivs:\t0" in res.stdout or "NoNewPrivs:\t1" in res.stdout
        assert not int(dict(line.split(":", 1) for line in res.stdout.splitlines()
                            if ":" in line)["CapBnd"], 16) & (1 << 12)
        # update: the guest's crun writes the container's cgroup
        runc("update", "--pids-limit", "20", "--memory", "64m", "s1")
        res = runc("exec", "s1", "cat", "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max")
        assert res.stdout.split() == ["20", str(64 << 20)], res.stdout
        (tmp_path / "r.json").write_text(json.dumps({"pids": {"limit": 30}}))
        runc("update", "-r", str(tmp_path / "r.json"), "s1")
        res = runc("exec", "s1", "cat", "/sys/fs/cgroup/pids.max")
        assert res.stdout.split() == ["30"], res.stdout
        res = runc("update", "--memory", "lots", "s1", check=False)
        assert res.returncode == 1 and "--memory" in res.stderr
    finally:
        runc("delete", "--force", "s1", check=False)
