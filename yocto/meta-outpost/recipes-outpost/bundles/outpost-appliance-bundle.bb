# nooelint: oelint.file.underscores,oelint.var.mandatoryvar.SRC_URI
SUMMARY = "RAUC update bundle of the Outpost appliance image"
DESCRIPTION = "A signed verity-format RAUC bundle that installs outpost-appliance-image into \
               the inactive root slot."
HOMEPAGE = "https://example.invalid/outpost"
BUGTRACKER = "https://example.invalid/outpost/issues"
SECTION = "admin"
LICENSE = "MIT"

inherit bundle

# Must equal compatible= in the target's /etc/rauc/system.conf (outpost-rauc-conf).
OUTPOST_RAUC_COMPATIBLE ??= "outpost-appliance-${MACHINE}"
RAUC_BUNDLE_COMPATIBLE = "${OUTPOST_RAUC_COMPATIBLE}"
RAUC_BUNDLE_FORMAT = "verity"
RAUC_BUNDLE_DESCRIPTION = "Outpost appliance root file system"

RAUC_BUNDLE_SLOTS = "rootfs"
RAUC_SLOT_rootfs = "outpost-appliance-image"
RAUC_SLOT_rootfs[fstype] = "ext4"

# Signing: set RAUC_KEY_FILE and RAUC_CERT_FILE (full paths or PKCS#11 URIs) in local.conf;
# the matching CA certificate goes into the image through outpost-rauc-conf (RAUC_KEYRING_FILE).
