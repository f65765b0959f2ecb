#!/usr/bin/env bash
# Reserves hugepages and mounts hugetlbfs for the Embarcadero-rs memory pool.
# Idempotent: raises reservations (never lowers them) and mounts only what is missing.
set -euo pipefail

SYSFS=/sys/kernel/mm/hugepages
COMPACT_FIX='echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory'

pages_2m=512
pages_1g=0
mount_2m=/dev/hugepages
mount_1g=/dev/hugepages1G

usage() {
    cat <<EOF
Usage: $(basename "$0") [--pages-2m N] [--pages-1g N] [--mount DIR] [--mount-1g DIR]

Makes sure the kernel holds at least N hugepages and that hugetlbfs is mounted:
  --pages-2m N    reserve at least N 2 MiB pages (default: $pages_2m, i.e. 1 GiB)
  --pages-1g N    reserve at least N 1 GiB pages and mount a 1 GiB hugetlbfs (default: 0)
  --mount DIR     mount point of the 2 MiB hugetlbfs (default: $mount_2m)
  --mount-1g DIR  mount point of the 1 GiB hugetlbfs (default: $mount_1g)
  -h, --help      show this help

Reservations are only ever raised. Safe to run again. Needs root.
EOF
}

die() {
    echo "setup-hugepages: $*" >&2
    exit 1
}

# Checks that option $1 has a value $2 that is a non-negative integer.
count_arg() {
    [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "$1 needs a page count (a non-negative integer)"
}

args=("$@")
while [[ $# -gt 0 ]]; do
    case $1 in
        --pages-2m) count_arg "$@"; pages_2m=$2; shift 2 ;;
        --pages-1g) count_arg "$@"; pages_1g=$2; shift 2 ;;
        --mount) [[ $# -ge 2 && -n $2 ]] || die "--mount needs a directory"; mount_2m=$2; shift 2 ;;
        --mount-1g) [[ $# -ge 2 && -n $2 ]] || die "--mount-1g needs a directory"; mount_1g=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    die "needs root: it writes $SYSFS/*/nr_hugepages and mounts hugetlbfs; run: sudo $0 ${args[*]}"
fi

# reserve LABEL SYSFS_DIR WANT: raises nr_hugepages to at least WANT and checks the kernel
# really allocated them.
reserve() {
    local label=$1 dir=$SYSFS/$2 want=$3
    [[ -d $dir ]] || die "this kernel has no $label pages ($dir is missing); boot with hugepagesz=1G"
    local file=$dir/nr_hugepages have
    have=$(<"$file")
    if ((have >= want)); then
        echo "$label pages: $have reserved, at least $want wanted, nothing to do"
        return
    fi
    echo "$want" >"$file" || die "could not write $want to $file"
    local got
    got=$(<"$file")
    if ((got < want)); then
        die "asked for $want $label pages but the kernel only has $got: it could not find" \
            "enough free contiguous memory (fragmentation or too little RAM)." \
            "Free and compact memory, then run this again: $COMPACT_FIX"
    fi
    echo "$label pages: raised from $have to $got"
}

# mount_hugetlbfs DIR PAGESIZE KERNEL_PAGESIZE: mounts hugetlbfs with PAGESIZE pages on DIR
# unless it is already there (/proc/mounts shows KERNEL_PAGESIZE, e.g. 1024M for 1G).
mount_hugetlbfs() {
    local dir=$1 size=$2 shown=$3 current
    current=$(findmnt -n -r -o FSTYPE,OPTIONS --mountpoint "$dir" | tail -n 1 || true)
    if [[ -n $current ]]; then
        local fstype=${current%% *} options=${current#* }
        [[ $fstype == hugetlbfs ]] || die "$dir is already a $fstype mount; choose another directory"
        if [[ ,$options, == *,pagesize=$size,* || ,$options, == *,pagesize=$shown,* ]]; then
            echo "hugetlbfs (pagesize=$size) already mounted on $dir, nothing to do"
            return
        fi
        die "$dir holds a hugetlbfs with other pages ($options); unmount it first: umount $dir"
    fi
    mkdir -p "$dir"
    mount -t hugetlbfs -o "pagesize=$size" none "$dir"
    echo "mounted hugetlbfs (pagesize=$size) on $dir"
}

reserve "2 MiB" hugepages-2048kB "$pages_2m"
if ((pages_1g > 0)); then
    reserve "1 GiB" hugepages-1048576kB "$pages_1g"
fi
mount_hugetlbfs "$mount_2m" 2M 2M
if ((pages_1g > 0)); then
    mount_hugetlbfs "$mount_1g" 1G 1024M
fi
