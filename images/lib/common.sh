# shellcheck shell=bash
# Shared helpers for images/build and images/test: logging, stage timing, host packages.
# Sourced, never executed. Everything here must work on a fresh Debian 12 machine as root.

log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

# stage NAME: closes the previous stage (printing its duration) and opens a new one.
# stage_end: closes the last one. The table is printed again by stage_summary.
_STAGE_NAME=""
_STAGE_START=0
_STAGE_TABLE=""
stage() {
    stage_end
    _STAGE_NAME="$1"
    _STAGE_START=$(date +%s.%N)
    log "── stage: $1"
}
stage_end() {
    if [ -n "$_STAGE_NAME" ]; then
        local secs
        secs=$(awk -v a="$_STAGE_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        log "── stage done: $_STAGE_NAME (${secs} s)"
        _STAGE_TABLE="${_STAGE_TABLE}$(printf '  %-58s %7s s' "$_STAGE_NAME" "$secs")"$'\n'
        _STAGE_NAME=""
    fi
}
stage_summary() {
    stage_end
    printf 'stage timings:\n%s' "$_STAGE_TABLE" >&2
}

# Debian 12's qemu-system-x86 cannot sit beside the qemu-utils from bookworm-backports that
# some machines already carry, so both come from backports.
ensure_backports() {
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports to apt sources"
        cat > /etc/apt/sources.list.d/outpost-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        _APT_UPDATED=""
    fi
}

# need_pkgs PKG...: installs the Debian packages that are missing. A PKG of the form
# name/bookworm-backports is taken from backports.
_APT_UPDATED=""
need_pkgs() {
    local missing=() bpo=() p name
    for p in "$@"; do
        name="${p%%/*}"
        if ! dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'install ok installed'; then
            if [ "$name" != "$p" ]; then bpo+=("$name"); else missing+=("$name"); fi
        fi
    done
    [ ${#missing[@]} -eq 0 ] && [ ${#bpo[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]} ${bpo[*]}: run as root or install them first"
    [ ${#bpo[@]} -gt 0 ] && ensure_backports
    if [ -z "$_APT_UPDATED" ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        _APT_UPDATED=1
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    if [ ${#bpo[@]} -gt 0 ]; then
        log "installing from bookworm-backports: ${bpo[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports "${bpo[@]}" >&2
    fi
}

# Where the agent binary is: $OUTPOST_AGENT, else the workspace's release build (honouring
# CARGO_TARGET_DIR), built with cargo when missing.
find_agent() {
    local repo="$1" target bin
    if [ -n "${OUTPOST_AGENT:-}" ]; then
        [ -x "$OUTPOST_AGENT" ] || die "OUTPOST_AGENT=$OUTPOST_AGENT is not an executable"
        echo "$OUTPOST_AGENT"; return
    fi
    target="${CARGO_TARGET_DIR:-$repo/target}"
    bin="$target/release/outpost"
    if [ ! -x "$bin" ] || [ -n "$(find "$repo/node/src" "$repo/protocol/src" "$repo/Cargo.lock" -newer "$bin" -print -quit 2>/dev/null)" ]; then
        command -v cargo >/dev/null || die "no agent binary at $bin and no cargo to build it (set OUTPOST_AGENT)"
        log "building the agent: cargo build --release --locked -p outpost-node"
        (cd "$repo" && cargo build --release --locked -p outpost-node >&2)
    fi
    echo "$bin"
}

# find_garage REPO: the Garage binary for the image (OUTPOST_GARAGE, else scripts/s3-server's,
# which builds it once per machine).
find_garage() {
    local repo="$1" tools
    if [ -n "${OUTPOST_GARAGE:-}" ]; then
        [ -x "$OUTPOST_GARAGE" ] || die "OUTPOST_GARAGE=$OUTPOST_GARAGE is not an executable"
        echo "$OUTPOST_GARAGE"; return
    fi
    tools="${OUTPOST_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outpost/tools}"
    "$repo/scripts/s3-server" install >&2 || die "could not install Garage (scripts/s3-server install)"
    echo "$tools/bin/garage"
}

# dev_keys DIR: a development update-signing CA and key pair in DIR, made once. Appliances built
# with them accept bundles signed by anyone holding DIR: production builds pass their own
# (OUTPOST_RAUC_KEYRING, OUTPOST_RAUC_CERT, OUTPOST_RAUC_KEY).
dev_keys() {
    local dir="$1"
    [ -s "$dir/signing.key.pem" ] && [ -s "$dir/signing.cert.pem" ] && [ -s "$dir/ca.cert.pem" ] && return 0
    log "generating development update-signing keys in $dir (not for production)"
    mkdir -p "$dir"; chmod 700 "$dir"
    local ext; ext=$(mktemp)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -keyout "$dir/ca.key.pem" -out "$dir/ca.cert.pem" \
        -subj "/O=Outpost development/CN=Outpost development update CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/signing.key.pem" -out "$dir/signing.csr" \
        -subj "/O=Outpost development/CN=Outpost development update signing" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' > "$ext"
    openssl x509 -req -in "$dir/signing.csr" -CA "$dir/ca.cert.pem" -CAkey "$dir/ca.key.pem" \
        -CAcreateserial -days 3650 -out "$dir/signing.cert.pem" -extfile "$ext" 2>/dev/null
    rm -f "$ext" "$dir/signing.csr"
}

# verity_image EXT4 OUT_IMG: OUT_IMG is EXT4 followed by its dm-verity hash tree (sha256, 4 KiB
# blocks, the tree's superblock right after the file system); prints "ROOTHASH OFFSET", the root
# hash that pins every block of the file system and the tree's byte offset. A root slot holds
# OUT_IMG; the boot entry carries both values (outpost.verity=), and the initramfs opens the slot
# through dm-verity, so a block that differs from what was built fails to read.
verity_image() {
    local ext4="$1" out="$2" size hash
    size=$(stat -c %s "$ext4")
    [ $((size % 4096)) -eq 0 ] || die "verity_image: $ext4 is not a whole number of 4 KiB blocks"
    rm -f "$out"
    cp --sparse=always "$ext4" "$out"
    hash=$(veritysetup format --hash=sha256 --data-block-size=4096 --hash-block-size=4096 \
        --data-blocks=$((size / 4096)) --hash-offset="$size" "$out" "$out" \
        | sed -n 's/^Root hash:[[:space:]]*\([0-9a-f]\{64\}\)$/\1/p')
    [ -n "$hash" ] || die "veritysetup format gave no root hash for $ext4"
    # Read it all back against the root hash: what the slot will hold is what was built.
    veritysetup verify --hash-offset="$size" "$out" "$out" "$hash" >&2 \
        || die "the hash tree of $out does not verify"
    echo "$hash $size"
}

# make_bundle ROOTFS_EXT4 VERSION OUT_FILE CERT KEY KEYRING: a signed verity RAUC bundle that
# installs ROOTFS_EXT4, with its dm-verity hash tree, into the inactive root slot. The bundle
# also carries the tree's root hash (rootfs.verity) and a hook that hands it to the boot backend
# after the slot is written (images/lib/bundle-hook): the hash the slot boots with comes from the
# signed bundle, not from the disk.
make_bundle() {
    local rootfs="$1" version="$2" out="$3" cert="$4" key="$5" keyring="$6" dir verity
    dir=$(mktemp -d "${out%/*}/.bundle.XXXXXX")
    verity=$(verity_image "$rootfs" "$dir/rootfs.ext4")
    printf 'hash=%s\noffset=%s\n' "${verity% *}" "${verity#* }" > "$dir/rootfs.verity"
    install -m 0755 "$(dirname "${BASH_SOURCE[0]}")/bundle-hook" "$dir/hook"
    cat > "$dir/manifest.raucm" <<MANIFEST
[update]
compatible=outpost-appliance-x86_64
version=$version
description=Outpost appliance root file system $version

[bundle]
format=verity

[hooks]
filename=hook

[image.rootfs]
filename=rootfs.ext4
hooks=post-install
MANIFEST
    rm -f "$out"
    rauc bundle --cert="$cert" --key="$key" --keyring="$keyring" \
        --mksquashfs-args="-comp zstd -Xcompression-level 6 -b 1M" "$dir" "$out" >&2
    rm -rf "$dir"
}

# human BYTES
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1; while (b >= 1024 && i < 5) { b /= 1024; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'; }
