SUMMARY = "Outpost appliance image"
DESCRIPTION = "A systemd image with the Outpost node agent, Docker and RAUC for A/B updates."
HOMEPAGE = "https://example.invalid/outpost"
BUGTRACKER = "https://example.invalid/outpost/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image features_check

REQUIRED_DISTRO_FEATURES = "systemd virtualization"

IMAGE_INSTALL:append = " \
    outpost \
    docker-moby \
    rauc \
    outpost-rauc-conf \
    ca-certificates \
    e2fsprogs-e2fsck \
    iproute2-ss \
"

# RAUC writes this ext4 image into a root slot (outpost-appliance-bundle).
IMAGE_FSTYPES:append = " ext4"
