SUMMARY = "Outpost node agent"
DESCRIPTION = "The Outpost node agent runs signed container jobs from the Outpost control \
               plane and reports each result exactly once. It only dials out and listens on \
               no port."
HOMEPAGE = "https://example.invalid/outpost"
BUGTRACKER = "https://example.invalid/outpost/issues"
SECTION = "admin"
CVE_PRODUCT = "outpost"
LICENSE = "Apache-2.0"
# The workspace's licence line (yocto/check keeps this checksum in step with Cargo.toml).
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=9;endline=9;md5=2507bd5f0713f05419cd2f22fa06fe62"

PV = "0.1.0+git"

SRC_URI = "git://example.invalid/outpost.git;protocol=https;branch=main"
# Pin a release in your distro or local.conf: OUTPOST_SRCREV = "<commit>"
OUTPOST_SRCREV ??= "${AUTOREV}"
SRCREV = "${OUTPOST_SRCREV}"

# Every crate of Cargo.lock as a crate:// SRC_URI entry with its checksum (yocto/gen-crates-inc).
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# A Cargo workspace: build only the agent's package; the lock file is at the workspace root.
CARGO_SRC_DIR = "node"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

# The unit and default configuration are the appliance image's (images/overlay in the source).
OUTPOST_OVERLAY = "${S}/images/overlay"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${OUTPOST_OVERLAY}/usr/lib/systemd/system/outpost.service ${D}${systemd_system_unitdir}/
    install -d ${D}${sysconfdir}/outpost/config.d
    install -m 0644 ${OUTPOST_OVERLAY}/etc/outpost/config.toml ${D}${sysconfdir}/outpost/
}

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system docker; --system --gid 970 outpost"
USERADD_PARAM:${PN} = "--system --uid 970 --gid outpost --groups docker \
                       --home-dir ${localstatedir}/lib/outpost --no-create-home \
                       --shell ${base_sbindir}/nologin outpost"

SYSTEMD_SERVICE:${PN} = "outpost.service"

CONFFILES:${PN} = "${sysconfdir}/outpost/config.toml"

# The agent drives Docker through its socket.
OUTPOST_CONTAINER_ENGINE ??= "docker-moby"
RDEPENDS:${PN} = "${OUTPOST_CONTAINER_ENGINE} ca-certificates"
