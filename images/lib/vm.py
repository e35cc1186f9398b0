"""A qemu-system-x86_64 virtual machine for images/test: UEFI (OVMF) boot of a disk image under
software emulation, its serial console captured to a log and matched line by line, USB sticks
plugged and unplugged through QMP. Standard library only."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Console lines worth echoing while a test runs: the appliance's own messages.
ECHO = re.compile(r"outpost-(boot|update|firstboot): |outpost agent ready|Reached target.*Multi-User|reboot: Restarting")


class VMError(RuntimeError):
    pass


class VM:
    def __init__(self, disk: Path, workdir: Path, *, mem_mib: int = 2048, cpus: int = 2,
                 accel: str = "tcg", echo: bool = True, net: bool = True):
        self.disk = disk
        # False: no NIC at all (an air-gapped appliance); read at each start().
        self.net = net
        self.workdir = workdir
        self.mem_mib = mem_mib
        self.cpus = cpus
        self.accel = accel
        self.echo = echo
        self.serial_log = workdir / "serial.log"
        self.qmp_path = workdir / "qmp.sock"
        self.serial_path = workdir / "serial.sock"
        self.vars = workdir / "OVMF_VARS.fd"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.first_started_at = 0.0
        self._serial: socket.socket | None = None
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        self._buf = ""
        self._lines: list[tuple[float, str]] = []
        self._pos = 0  # next line index that wait_for() looks at
        self._log = None
        self._timed = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        if not self.vars.exists():
            shutil.copy(OVMF_VARS, self.vars)
        for p in (self.qmp_path, self.serial_path):
            p.unlink(missing_ok=True)
        # A second start (the same disk booted again): new console, earlier lines stay seen.
        for f in (self._serial, self._qmp, self._log, self._timed):
            if f:
                f.close()
        self._buf = ""
        self._qmp_buf = b""
        self._pos = len(self._lines)
        cmd = [
            # -nodefaults: no empty CD-ROM (the firmware would try to boot it) and no VGA.
            "qemu-system-x86_64", "-nodefaults", "-machine", "q35", "-accel", self.accel,
            "-smp", str(self.cpus), "-m", str(self.mem_mib),
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={self.vars}",
            "-drive", f"file={self.disk},if=virtio,format={'qcow2' if self.disk.suffix == '.qcow2' else 'raw'},cache=unsafe",
            "-device", "virtio-rng-pci",
            "-device", "qemu-xhci,id=xhci",
            "-device", "i6300esb", "-action", "watchdog=reset",
            "-display", "none", "-monitor", "none",
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.net:
            # No option ROM on the NIC: the firmware does not try network boot first. A fixed
            # slot apart from the others: with or without the NIC the disk keeps its PCI path,
            # so the firmware's boot entry from an earlier boot still finds it.
            cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=,addr=0x10"]
        self._log = open(self.serial_log, "a", encoding="utf-8", errors="replace")
        # The same lines without escape codes, each with the seconds since qemu started.
        self._timed = open(self.workdir / "serial.timed.log", "a", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        self.first_started_at = self.first_started_at or self.started_at
        deadline = time.monotonic() + 30
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.serial_path))
                s.setblocking(False)
                self._serial = s
                q = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                q.connect(str(self.qmp_path))
                q.settimeout(30)
                self._qmp = q
                break
            except OSError:
                if self.proc.poll() is not None:
                    out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                    raise VMError(f"qemu exited at start: {out.strip()}")
                if time.monotonic() > deadline:
                    raise VMError("qemu's serial or QMP socket did not appear in 30 s")
                time.sleep(0.1)
        self._qmp_recv()  # greeting
        self.qmp("qmp_capabilities")

    def elapsed(self) -> float:
        """Seconds since this boot's qemu started."""
        return time.monotonic() - self.started_at

    def total_elapsed(self) -> float:
        """Seconds since the first start() of this VM object."""
        return time.monotonic() - self.first_started_at if self.first_started_at else 0.0

    def stop(self, timeout: float = 120) -> None:
        """ACPI power button, then wait for qemu to exit (kill it after timeout)."""
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            self.qmp("system_powerdown")
        except (OSError, VMError):
            pass
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.5)
        if self.proc.poll() is None:
            self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.flush()
            self._timed.flush()

    # ------------------------------------------------------------------ QMP
    def _qmp_recv(self) -> dict:
        assert self._qmp
        while b"\n" not in self._qmp_buf:
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise VMError("QMP connection closed")
            self._qmp_buf += chunk
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    def qmp(self, command: str, **arguments) -> dict:
        assert self._qmp
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._qmp_recv()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise VMError(f"QMP {command}: {reply['error'].get('desc')}")
            # asynchronous events are ignored

    def plug_usb(self, image: Path, ident: str) -> None:
        """Plug a raw disk image in as a read-only USB stick."""
        self.qmp("blockdev-add", **{"node-name": f"{ident}-file", "driver": "file",
                                    "filename": str(image), "read-only": True})
        self.qmp("blockdev-add", **{"node-name": ident, "driver": "raw",
                                    "file": f"{ident}-file", "read-only": True})
        self.qmp("device_add", driver="usb-storage", bus="xhci.0", drive=ident, id=f"{ident}-dev",
                 removable=True)

    def unplug_usb(self, ident: str) -> None:
        self.qmp("device_del", id=f"{ident}-dev")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.qmp("blockdev-del", **{"node-name": ident})
                break
            except VMError:
                self._pump(0.5)
        try:
            self.qmp("blockdev-del", **{"node-name": f"{ident}-file"})
        except VMError:
            pass

    # ------------------------------------------------------------------ serial console
    def _pump(self, wait: float) -> None:
        """Read what the console printed within `wait` seconds into complete lines."""
        assert self._serial
        end = time.monotonic() + wait
        while True:
            try:
                chunk = self._serial.recv(65536)
                if not chunk:
                    break
                text = chunk.decode("utf-8", errors="replace")
                self._log.write(text)
                self._buf += text
                while "\n" in self._buf:
                    raw, self._buf = self._buf.split("\n", 1)
                    line = ANSI.sub("", raw).replace("\r", "").rstrip()
                    self._lines.append((self.elapsed(), line))
                    self._timed.write(f"{self.elapsed():8.2f} {line}\n")
                    if self.echo and ECHO.search(line):
                        print(f"  vm {self.elapsed():6.1f}s | {line.strip()[:200]}", flush=True)
                continue
            except BlockingIOError:
                pass
            if time.monotonic() >= end:
                break
            time.sleep(0.05)
        self._log.flush()
        self._timed.flush()

    def send(self, text: str) -> None:
        assert self._serial
        self._serial.setblocking(True)
        self._serial.sendall(text.encode())
        self._serial.setblocking(False)

    def wait_for(self, pattern: str, timeout: float, *, fail: str | None = None) -> re.Match:
        """The first console line (not seen by an earlier wait) matching `pattern`. Raises when
        `fail` matches first, qemu exits, or `timeout` seconds pass."""
        rx = re.compile(pattern)
        frx = re.compile(fail) if fail else None
        deadline = time.monotonic() + timeout
        while True:
            while self._pos < len(self._lines):
                _, line = self._lines[self._pos]
                self._pos += 1
                m = rx.search(line)
                if m:
                    return m
                if frx and frx.search(line):
                    raise VMError(f"console showed a failure: {line.strip()}")
            if self.proc and self.proc.poll() is not None:
                raise VMError(f"qemu exited (status {self.proc.returncode}) while waiting for /{pattern}/")
            if time.monotonic() > deadline:
                raise VMError(f"no console line matched /{pattern}/ within {timeout:.0f} s "
                              f"(log: {self.serial_log})")
            self._pump(0.5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self._lines[-n:])


def wait_exit(vm: VM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while vm.proc and vm.proc.poll() is None and time.monotonic() < deadline:
        vm._pump(0.5)


if __name__ == "__main__":  # a manual boot for debugging: python3 vm.py DISK WORKDIR
    import sys

    d = Path(sys.argv[2])
    d.mkdir(parents=True, exist_ok=True)
    v = VM(Path(sys.argv[1]), d)
    v.start()
    try:
        while v.proc.poll() is None:
            v._pump(1)
    finally:
        v.kill()
    os._exit(0)
