#!/usr/bin/env bash
# Installs what building and testing streamhelper needs, only when it is missing:
# cmake and a C++ compiler (grpcio-sys), protoc (build.rs), OpenSSL headers (TLS),
# the real etcd server (tests and the demo), Prometheus with promtool (tests of the shipped
# alerts and dashboard), tmux (the demo's full-screen view under test) and the openssl command (TLS tests, which
# make their own certificates), rustfmt and clippy for the gates, and moto's S3 server from
# PyPI (storage tests) in a private venv when the system Python lacks it. Debian/Ubuntu only.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The storage tests look for moto in the system Python first, then in this venv.
moto_venv="${HOME}/.cache/streamhelper-moto"
has_moto() { "$1" -c 'import moto.server, flask_cors' >/dev/null 2>&1; }
if ! has_moto python3 && ! has_moto "$moto_venv/bin/python3"; then
    echo "installing moto[server] into $moto_venv" >&2
    python3 -m venv "$moto_venv"
    "$moto_venv/bin/python3" -m pip install --quiet 'moto[server]'
fi

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
        echo "installing the $component component" >&2
        rustup component add "$component"
    fi
done
