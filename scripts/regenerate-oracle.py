#!/usr/bin/env python3
"""Regenerate the QEMU 7.2 oracle dumps in tests/data/oracle from a real QEMU.

Every dump in tests/data/oracle is QEMU's own output; this script makes them
again from the command lines stored beside them, so anyone can check them or
add a machine (write `<dir>/<name>.cmdline`, run the script with that name).

Requirements (Debian bookworm packages, QEMU 7.2):
    apt-get install qemu-system-x86 qemu-system-arm
    apt-get install ovmf swtpm      # only for q35-pflash and the TPM variants

Usage:
    scripts/regenerate-oracle.py [--out DIR] [--only SUBSTRING ...] [--check]

  --out DIR   write there instead of tests/data/oracle (default)
  --only S    only machines/scenarios whose path contains S
  --check     write nothing; compare with the stored dumps modulo block order
              and FlatView numbering (what canon.py does) and exit 1 on a
              difference

Environment: QEMU_BIN_DIR, a folder holding the qemu-system-* binaries to use
instead of those on PATH; QEMU_DATADIR, passed as `-L` (firmware folder), for
a QEMU unpacked from its .deb files rather than installed.

Static machines (`x86_64/`, `aarch64/`, `variants/`): the machine is started
paused (the `.cmdline` already says `-S -display none -nodefaults`) with a QMP
socket added, and `info mtree` is asked five ways over QMP's
human-monitor-command. Dynamic scenarios (`dynamic/<name>/`): the transcript's
`>` lines are replayed over a qtest socket, and at each `### snapshot NN-label`
marker three dumps are taken (`-D`, `-f`, plain).

`FW/` in a command line stands for a folder of dummy firmware files that this
script creates in a temporary directory.
"""

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "data" / "oracle"
sys.path.insert(0, str(DEFAULT_OUT))

STATIC_DUMPS = {
    "mtree.txt": "info mtree",
    "disabled.txt": "info mtree -D",
    "flat.txt": "info mtree -f",
    "owner.txt": "info mtree -o",
    "flat-owner.txt": "info mtree -f -o",
}
DYNAMIC_DUMPS = {
    "disabled.txt": "info mtree -D",
    "flat.txt": "info mtree -f",
    "mtree.txt": "info mtree",
}


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path, process, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"QEMU exited ({process.returncode}): {err}")
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP socket {path} never came up")
                time.sleep(0.05)
        self.buf = b""
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def hmp(self, line):
        # The monitor ends lines with CRLF; the stored dumps use LF.
        text = self.command("human-monitor-command", **{"command-line": line})
        return text.replace("\r\n", "\n")


def firmware_dir(tmp):
    """The dummy files `FW/` stands for."""
    fw = Path(tmp) / "FW"
    fw.mkdir()
    with open(fw / "nvdimm.img", "wb") as f:
        f.truncate(256 << 20)
    vars_src = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    if vars_src.exists():
        shutil.copy(vars_src, fw / "OVMF_VARS_4M.fd")
    return fw


def start_swtpm(fw, tmp):
    if not shutil.which("swtpm"):
        return None
    state = Path(tmp) / "tpmstate"
    state.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--ctrl", f"type=unixio,path={fw / 'swtpm.sock'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if (fw / "swtpm.sock").exists():
            break
        time.sleep(0.05)
    return proc


def qemu_argv(cmdline, fw):
    argv = shlex.split(cmdline.replace("FW/", f"{fw}/"))
    bin_dir = os.environ.get("QEMU_BIN_DIR")
    if bin_dir:
        argv[0] = str(Path(bin_dir) / argv[0])
    if not shutil.which(argv[0]):
        raise FileNotFoundError(f"{argv[0]} is not installed")
    datadir = os.environ.get("QEMU_DATADIR")
    if datadir:
        argv[1:1] = ["-L", datadir]
    return argv


def stop(proc):
    if proc and proc.poll() is None:
        proc.kill()
    if proc:
        proc.wait()


def run_static(cmdfile, out_dir):
    name = cmdfile.name[: -len(".cmdline")]
    with tempfile.TemporaryDirectory() as tmp:
        fw = firmware_dir(tmp)
        tpm = start_swtpm(fw, tmp) if "swtpm" in cmdfile.read_text() else None
        qmp_path = Path(tmp) / "qmp.sock"
        argv = qemu_argv(cmdfile.read_text().strip(), fw)
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            qmp = Qmp(qmp_path, process=qemu)
            dumps = {suffix: qmp.hmp(cmd) for suffix, cmd in STATIC_DUMPS.items()}
            qmp.command("quit")
        finally:
            stop(qemu)
            stop(tpm)
    return {out_dir / f"{name}.{suffix}": text for suffix, text in dumps.items()}


def run_dynamic(scenario, out_dir):
    cmdline = (scenario / "cmdline.txt").read_text().strip()
    transcript = (scenario / "transcript.txt").read_text().splitlines()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fw = firmware_dir(tmp)
        qtest_path = Path(tmp) / "qtest.sock"
        qmp_path = Path(tmp) / "qmp.sock"
        # The stored command line names both sockets `<sock>`: the first is
        # qtest's (QEMU connects to us), the second QMP's (QEMU listens).
        cmdline = cmdline.replace("<sock>", str(qtest_path), 1)
        cmdline = cmdline.replace("<sock>", str(qmp_path), 1)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(qtest_path))
        listener.listen(1)
        listener.settimeout(30)
        qemu = subprocess.Popen(qemu_argv(cmdline, fw),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            qtest, _ = listener.accept()
            qtest.settimeout(30)
            qtest_in = qtest.makefile("rb")
            qmp = Qmp(qmp_path, process=qemu)
            for line in transcript:
                if line.startswith("### snapshot "):
                    label = line[len("### snapshot "):].strip()
                    for suffix, cmd in DYNAMIC_DUMPS.items():
                        results[out_dir / f"{label}.{suffix}"] = qmp.hmp(cmd)
                elif line.startswith("> "):
                    qtest.sendall(line[2:].encode() + b"\n")
                    reply = qtest_in.readline().decode().rstrip("\n")
                    if not reply.startswith("OK"):
                        raise RuntimeError(f"{scenario.name}: qtest `{line[2:]}` -> `{reply}`")
            qmp.command("quit")
        finally:
            stop(qemu)
            listener.close()
    return results


def canonical(text):
    import canon  # tests/data/oracle/canon.py
    return canon.canon(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    src = DEFAULT_OUT
    jobs = []
    for sub in ["x86_64", "aarch64", "variants"]:
        for cmdfile in sorted((src / sub).glob("*.cmdline")):
            jobs.append((cmdfile, "static", args.out / sub))
    for scenario in sorted((src / "dynamic").iterdir()):
        if scenario.is_dir():
            jobs.append((scenario, "dynamic", args.out / "dynamic" / scenario.name))
    if args.only:
        jobs = [j for j in jobs if any(s in str(j[0]) for s in args.only)]

    failed = differ = 0
    for path, kind, out_dir in jobs:
        rel = path.relative_to(src)
        try:
            files = run_static(path, out_dir) if kind == "static" else run_dynamic(path, out_dir)
        except (RuntimeError, OSError) as e:
            print(f"{rel}: FAILED: {e}", file=sys.stderr)
            failed += 1
            continue
        for dest, text in files.items():
            if args.check:
                old = dest.read_text() if dest.exists() else ""
                if canonical(old) != canonical(text):
                    print(f"{dest.relative_to(args.out)}: differs")
                    differ += 1
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text)
        print(f"{rel}: {len(files)} dumps")
    print(f"{len(jobs)} machines/scenarios, {failed} failed, {differ} dumps differ")
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
