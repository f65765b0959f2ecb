# Shared helpers for the scripts (sourced, not run).

# Installs the Debian packages given that are not installed yet (needs root; says so if not).
ensure_packages() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing Debian packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "installing ${missing[*]}"
    # Wait for another apt run (unattended upgrades, a parallel job) instead of failing.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
}

# Fails with a clear message when cargo is not there (the toolchain comes from rustup).
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install the Rust toolchain with rustup (https://rustup.rs), then run again" >&2
        return 1
    }
}

# Reserves hugepages and mounts hugetlbfs when root; otherwise explains what will be skipped.
prepare_hugepages() {
    local pages_2m=$1
    if [[ $(id -u) -eq 0 ]]; then
        "$(dirname "${BASH_SOURCE[0]}")/setup-hugepages.sh" --pages-2m "$pages_2m"
    else
        echo "not root: hugepages are not reserved; tests that need them print 'skipped' (run as root to include them)"
    fi
}

# Kafka client libraries no one here wrote, for the Kafka listener's tests and demo:
# confluent-kafka (librdkafka, bundled in its wheel) and kafka-python, pinned, in a virtual
# environment of Debian's Python at target/kafka-py (KAFKA_PYTHON names its interpreter).
KAFKA_PY_PACKAGES=(confluent-kafka==2.16.2 kafka-python==3.0.12)
ensure_kafka_clients() {
    ensure_packages python3 python3-venv
    local venv=target/kafka-py
    if ! "$venv/bin/python" -c 'import confluent_kafka, kafka' >/dev/null 2>&1; then
        echo "installing ${KAFKA_PY_PACKAGES[*]} into $venv"
        rm -rf "$venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "${KAFKA_PY_PACKAGES[@]}"
    fi
    KAFKA_PYTHON="$(pwd)/$venv/bin/python"
    export KAFKA_PYTHON
}
