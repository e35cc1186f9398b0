# nooelint: oelint.file.underscores
SUMMARY = "RAUC system configuration for Outpost appliances"
DESCRIPTION = "RAUC's system.conf for the Outpost slot layout (GPT partitions root-a and \
               root-b) and the keyring that update bundles must be signed for. Select it with \
               PREFERRED_RPROVIDER_virtual-rauc-conf = \"outpost-rauc-conf\"."
HOMEPAGE = "https://example.invalid/outpost"
BUGTRACKER = "https://example.invalid/outpost/issues"
SECTION = "admin"
LICENSE = "MIT"
# Configuration files only: the common MIT text is the licence.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

# The CA certificate update bundles are verified against (the pair that signs them stays with
# whoever builds outpost-appliance-bundle: RAUC_KEY_FILE, RAUC_CERT_FILE).
RAUC_KEYRING_FILE ??= "ca.cert.pem"
RAUC_KEYRING_URI ??= "file://${RAUC_KEYRING_FILE}"
OUTPOST_RAUC_COMPATIBLE ??= "outpost-appliance-${MACHINE}"

SRC_URI = "file://system.conf \
           ${RAUC_KEYRING_URI} \
           "

RPROVIDES:${PN} += "virtual-rauc-conf"

do_install() {
    install -d ${D}${sysconfdir}/rauc
    sed -e 's/@OUTPOST_RAUC_COMPATIBLE@/${OUTPOST_RAUC_COMPATIBLE}/' \
        -e 's#@RAUC_KEYRING_FILE@#${RAUC_KEYRING_FILE}#' \
        ${UNPACKDIR}/system.conf > ${D}${sysconfdir}/rauc/system.conf
    chmod 0644 ${D}${sysconfdir}/rauc/system.conf
    install -m 0644 ${UNPACKDIR}/${RAUC_KEYRING_FILE} ${D}${sysconfdir}/rauc/
}

CONFFILES:${PN} = "${sysconfdir}/rauc/system.conf"
