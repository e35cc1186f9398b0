"""The appliance scenario images/test runs in one virtual machine (qemu, software emulation):

1. first boot from slot A: first-boot enrollment, the agent reports ready on the console; the
   boot report (printed by outpost-boot-check inside the VM) shows nothing listening on a
   non-loopback address;
2. A/B update: a USB stick with a signed bundle of version UPDATE is plugged in; the appliance
   installs it into slot B, reboots, and slot B comes up good with the new version;
3. rollback: a stick with a bundle whose agent never becomes ready (version BROKEN) is plugged in;
   it is installed into slot A, the trial boot fails, the boot check marks it bad and reboots,
   and systemd-boot falls back to slot B (boot counting), which comes up good again;
4. offline boot: powered off, booted again with no network interface at all (an air-gapped
   site): the agent becomes ready, the object store works, nothing listens.

Between 2 and 3, a tampered slot (with --corrupt-at and --esp-offset): powered off, one byte of
slot A (now the inactive one) is flipped on the disk and slot A is made the next boot's trial
entry; it boots, its trial boot reads the whole slot through dm-verity, finds the block, is
marked bad, and slot B boots again. Every boot report must show the containers' AppArmor profile
enforced and the root slot opened through dm-verity.

usage: abtest.py --disk DISK --workdir DIR --base V --update V --update-stick IMG
                 --broken V --broken-stick IMG [--corrupt-at BYTES --esp-offset BYTES]
                 [--skip-ab] [--timeout-scale F]
Prints progress and one JSON object with the measured figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vm import VM, VMError  # noqa: E402

REPORT = (r"outpost-boot: slot=(?P<slot>\S+) version=(?P<version>\S+) assessment=(?P<assessment>\S+) "
          r"agent=(?P<agent>\S+) ready_s=(?P<ready_s>\S+) runtime=(?P<runtime>\S+) "
          r"runtime_s=(?P<runtime_s>\S+) uptime_s=(?P<uptime_s>\S+) "
          r"slots=(?P<slots>\S+) listeners=(?P<listeners>\S+)(?: storage=(?P<storage>\S+))?"
          r"(?: apparmor=(?P<apparmor>\S+))?(?: verity=(?P<verity>\S+))?(?: verity_s=(?P<verity_s>\S+))?")
# DHCP clients (v4 port 68, v6 port 546) hold a UDP socket on the leased address to renew it;
# they answer no requests. Everything else on a non-loopback address fails the test.
DHCP_CLIENT = re.compile(r"^udp:.*:(68|546)$")


def say(msg: str) -> None:
    print(f"abtest: {msg}", flush=True)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise VMError(msg)


def exposed(listeners: str) -> list[str]:
    if listeners == "none":
        return []
    return [entry for entry in listeners.split(",") if not DHCP_CLIENT.match(entry)]


def boot_report(vm: VM, timeout: float) -> dict:
    m = vm.wait_for(REPORT, timeout)
    report = m.groupdict()
    say(f"boot report at {vm.elapsed():.1f}s: " + " ".join(f"{k}={v}" for k, v in report.items()))
    return report


def confined(r: dict, when: str) -> None:
    """Every boot: containers' AppArmor profile enforced, root slot read through dm-verity."""
    check(r["apparmor"] == "enforce", f"{when}: the containers' AppArmor profile: {r['apparmor']}")
    check(r["verity"] in ("ok", "verified"), f"{when}: the root slot's dm-verity state: {r['verity']}")


def mtools(*args: str) -> str:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    return subprocess.run(list(args), check=True, capture_output=True, text=True, env=env).stdout


def tamper_slot_a(disk: Path, corrupt_at: int, esp_offset: int) -> None:
    """With the VM off: flip one byte of slot A and make slot A the next boot's trial entry
    (what a technician or an attacker with the disk could do, short of the ESP's signature)."""
    with open(disk, "r+b") as f:
        f.seek(corrupt_at)
        b = f.read(1)
        f.seek(corrupt_at)
        f.write(bytes([b[0] ^ 0xFF]))
    img = f"{disk}@@{esp_offset}"
    names = mtools("mdir", "-b", "-i", img, "::/loader/entries").split()
    names = [n.rsplit("/", 1)[-1] for n in names]
    a = [n for n in names if n.startswith("outpost-a")]
    b = [n for n in names if n.startswith("outpost-b")]
    check(len(a) == 1 and len(b) == 1, f"boot entries on the ESP: {names}")

    def rewrite(old: str, new: str, sort_key: str) -> None:
        text = mtools("mtype", "-i", img, f"::/loader/entries/{old}")
        lines = [ln for ln in text.splitlines() if not ln.startswith("sort-key")]
        lines.append(f"sort-key {sort_key}")
        local = disk.parent / new
        local.write_text("\n".join(lines) + "\n")
        if old != new:
            mtools("mdel", "-i", img, f"::/loader/entries/{old}")
        mtools("mcopy", "-o", "-i", img, str(local), f"::/loader/entries/{new}")
        local.unlink()

    rewrite(a[0], "outpost-a+3.conf", "outpost-0")
    rewrite(b[0], b[0], "outpost-1")


def wait_off(vm: VM) -> None:
    """stop() kills qemu when the guest does not power off in time: that is a failure here."""
    check(vm.proc is not None and vm.proc.returncode == 0,
          f"the appliance did not power off cleanly (qemu status {vm.proc.returncode if vm.proc else None})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--update", required=True)
    ap.add_argument("--update-stick", type=Path)
    ap.add_argument("--broken", required=True)
    ap.add_argument("--broken-stick", type=Path)
    ap.add_argument("--corrupt-at", type=int, help="byte offset in DISK inside slot A's file system")
    ap.add_argument("--esp-offset", type=int, help="byte offset of the ESP in DISK")
    ap.add_argument("--skip-ab", action="store_true")
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    args = ap.parse_args()
    t = args.timeout_scale
    args.workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    vm = VM(args.disk, args.workdir)
    ok = False
    try:
        # -------------------------------------------------------------- 1. first boot
        say("booting the image (slot A), software emulation")
        vm.start()
        vm.wait_for(r"outpost-firstboot: enrolled as", 600 * t, fail=r"outpost-firstboot: enrollment failed for")
        ready = vm.wait_for(r"outpost agent ready", 600 * t, fail=r"outpost-boot: boot BAD")
        figures["boot_to_ready_s"] = round(vm.elapsed(), 1)
        say(f"agent ready {figures['boot_to_ready_s']} s after qemu started ({ready.group(0)})")
        r = boot_report(vm, 300 * t)
        check(r["slot"] == "A", f"first boot came up from slot {r['slot']}, expected A")
        check(r["version"] == args.base, f"first boot runs version {r['version']}, expected {args.base}")
        check(r["agent"] == "ready", f"agent state {r['agent']}")
        figures["ready_after_kernel_start_s"] = float(r["ready_s"])
        check(r["runtime"] == "ready", f"the agent's container runtime: {r['runtime']}")
        figures["runtime_ready_after_kernel_start_s"] = float(r["runtime_s"])
        say(f"the agent runs jobs (dockerd answered) {r['runtime_s']} s after kernel start, "
            f"{float(r['runtime_s']) - float(r['ready_s']):.1f} s after the agent was ready")
        bad = exposed(r["listeners"])
        check(not bad, f"listening on non-loopback addresses: {', '.join(bad)}")
        figures["non_loopback_listeners"] = r["listeners"]
        say(f"no service listens on a non-loopback address (sockets seen: {r['listeners']})")
        check(r["storage"] == "ready", f"local object store: {r['storage']} (an object put and read back)")
        say("the local object store (Garage on loopback) stores and returns an object for the agent")
        confined(r, "first boot")
        say(f"containers' AppArmor profile enforced; root slot read through dm-verity ({r['verity']})")
        vm.wait_for(r"outpost-boot: boot GOOD", 60 * t)

        if not args.skip_ab:
            # ---------------------------------------------------------- 2. A/B update
            say(f"plugging in a USB stick with the update bundle (version {args.update})")
            t0 = vm.elapsed()
            vm.plug_usb(args.update_stick, "upd1")
            vm.wait_for(rf"outpost-update: installing .*version {re.escape(args.update)}", 300 * t,
                        fail=r"outpost-update: .*(rejected|failed)")
            m = vm.wait_for(r"outpost-update: installed version \S+ in (\d+) s", 1200 * t,
                            fail=r"outpost-update: .*failed")
            figures["update_install_s"] = int(m.group(1))
            t_reboot = vm.elapsed()
            vm.wait_for(r"outpost agent ready", 900 * t, fail=r"outpost-boot: boot BAD")
            r = boot_report(vm, 300 * t)
            check(r["slot"] == "B", f"after the update the appliance runs slot {r['slot']}, expected B")
            check(r["version"] == args.update, f"slot B runs version {r['version']}, expected {args.update}")
            check(r["assessment"] == "indeterminate",
                  f"slot B's first boot should be a counted trial boot, assessment is {r['assessment']}")
            check(not exposed(r["listeners"]), f"slot B listens on: {r['listeners']}")
            check(r["runtime"] == "ready", f"slot B's container runtime: {r['runtime']}")
            check(r["storage"] == "ready", f"slot B's object store: {r['storage']}")
            confined(r, "slot B's trial boot")
            check(r["verity"] == "verified", f"slot B's trial boot did not read its whole slot: verity={r['verity']}")
            figures["trial_slot_verify_s"] = float(r["verity_s"])
            say(f"slot B's trial boot read its whole slot through dm-verity in {r['verity_s']} s")
            vm.wait_for(r"outpost-boot: boot GOOD", 60 * t)
            figures["update_reboot_to_ready_s"] = round(vm.elapsed() - t_reboot, 1)
            figures["ab_update_s"] = round(vm.elapsed() - t0, 1)
            # The stick is still in: the new slot looks at it once it is blessed, and must skip
            # the bundle it already runs. Unplug only after that, not while it is being read.
            vm.wait_for(r"outpost-update: .*(already running|tried before), skipping", 300 * t)
            vm.wait_for(r"outpost-update: nothing to install from", 120 * t)
            say(f"A/B update done in {figures['ab_update_s']} s (install {figures['update_install_s']} s, "
                f"reboot to ready {figures['update_reboot_to_ready_s']} s)")
            vm.unplug_usb("upd1")

            if args.corrupt_at is not None:
                # ------------------------------------------------------ 2b. a tampered slot
                say("powering off; flipping one byte of slot A (inactive) and making it the trial entry")
                vm.stop(180 * t)
                wait_off(vm)
                tamper_slot_a(args.disk, args.corrupt_at, args.esp_offset)
                vm.start()
                r = boot_report(vm, 900 * t)
                check(r["slot"] == "A", f"the tampered trial boot came up from slot {r['slot']}, expected A")
                check(r["verity"] == "corrupted", f"slot A's flipped byte went unnoticed: verity={r['verity']}")
                vm.wait_for(r"outpost-boot: boot BAD: trial boot of slot A failed: blocks of the slot do not match",
                            60 * t)
                r = boot_report(vm, 900 * t)
                check(r["slot"] == "B", f"after the tampered trial the appliance runs slot {r['slot']}, expected B")
                check("A:bad" in r["slots"], f"the tampered slot A should be marked bad, slots: {r['slots']}")
                check(r["agent"] == "ready" and r["runtime"] == "ready",
                      f"slot B after the tampered trial: agent {r['agent']}, runtime {r['runtime']}")
                confined(r, "slot B after the tampered trial")
                vm.wait_for(r"outpost-boot: boot GOOD", 60 * t)
                figures["tampered_slot_refused_s"] = round(vm.elapsed(), 1)
                say(f"slot A with one flipped byte was refused on its trial boot; back on slot B "
                    f"{figures['tampered_slot_refused_s']} s after power-on")

            # ---------------------------------------------------------- 3. rollback
            say(f"plugging in a USB stick with a broken bundle (version {args.broken}, agent never ready)")
            t1 = vm.elapsed()
            vm.plug_usb(args.broken_stick, "upd2")
            vm.wait_for(rf"outpost-update: installing .*version {re.escape(args.broken)}", 300 * t,
                        fail=r"outpost-update: .*(rejected|failed)")
            vm.wait_for(r"outpost-update: installed version", 1200 * t, fail=r"outpost-update: .*failed")
            r = boot_report(vm, 900 * t)
            check(r["slot"] == "A" and r["version"] == args.broken,
                  f"expected the trial boot of slot A with {args.broken}, got slot {r['slot']} {r['version']}")
            check(r["agent"] != "ready", "the broken agent reported ready")
            vm.wait_for(r"outpost-boot: boot BAD: trial boot of slot A failed", 60 * t)
            r = boot_report(vm, 900 * t)
            check(r["slot"] == "B", f"after the failed trial the appliance runs slot {r['slot']}, expected B")
            check(r["version"] == args.update, f"slot B runs version {r['version']}, expected {args.update}")
            check(r["agent"] == "ready" and r["runtime"] == "ready",
                  f"agent state after rollback: {r['agent']}, runtime {r['runtime']}")
            check("A:bad" in r["slots"], f"slot A should be marked bad, slots: {r['slots']}")
            confined(r, "slot B after the rollback")
            vm.wait_for(r"outpost-boot: boot GOOD", 60 * t)
            figures["rollback_s"] = round(vm.elapsed() - t1, 1)
            vm.wait_for(r"outpost-update: .*tried before, skipping", 300 * t)
            vm.wait_for(r"outpost-update: nothing to install from", 120 * t)
            say(f"rolled back to slot B ({args.update}) in {figures['rollback_s']} s after plugging the broken bundle")
            vm.unplug_usb("upd2")

        say("powering off")
        vm.stop(180 * t)
        wait_off(vm)

        # -------------------------------------------------------------- 4. offline boot
        # An air-gapped appliance has no network at all: the agent must still become ready
        # (nothing on the way to it waits for a network), and the local object store works.
        say("booting again without a network interface (air-gapped)")
        vm.net = False
        vm.start()
        vm.wait_for(r"outpost agent ready", 600 * t, fail=r"outpost-boot: boot BAD")
        figures["offline_boot_to_ready_s"] = round(vm.elapsed(), 1)
        r = boot_report(vm, 300 * t)
        check(r["agent"] == "ready", f"agent state without network: {r['agent']}")
        figures["offline_ready_after_kernel_start_s"] = float(r["ready_s"])
        check(r["runtime"] == "ready", f"the agent's container runtime without network: {r['runtime']}")
        figures["offline_runtime_ready_after_kernel_start_s"] = float(r["runtime_s"])
        check(r["storage"] == "ready", f"local object store without network: {r['storage']}")
        check(r["listeners"] == "none", f"listening without network on: {r['listeners']}")
        confined(r, "offline boot")
        vm.wait_for(r"outpost-boot: boot GOOD", 60 * t)
        say(f"agent ready without network {figures['offline_boot_to_ready_s']} s after qemu started "
            f"({figures['offline_ready_after_kernel_start_s']} s after kernel start; runs jobs "
            f"{figures['offline_runtime_ready_after_kernel_start_s']} s after kernel start)")
        say("powering off")
        vm.stop(180 * t)
        ok = True
    except VMError as e:
        say(f"FAILED: {e}")
        print("---- last console lines ----\n" + vm.tail(60) + "\n----", flush=True)
    finally:
        vm.kill()
    figures["ok"] = ok
    figures["vm_seconds"] = round(vm.total_elapsed(), 1)
    print(json.dumps(figures), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
