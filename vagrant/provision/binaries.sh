#!/usr/bin/env bash
# Sourced by the Nomad scripts: `install_binary NAME` copies NAME from vagrant/bin/ (put the
# release binaries of Nomad and the NVIDIA device plugin there, from your own mirror) to
# /usr/local/bin, or keeps one already installed.
install_binary() {
  local name="$1" src="/opt/mctl/src/vagrant/bin/$1"
  if [[ -x "/usr/local/bin/$name" ]]; then return 0; fi
  if [[ ! -f "$src" ]]; then
    echo "vagrant/bin/$name is missing: put the $name release binary there (see vagrant/README.md) and run 'vagrant provision'." >&2
    exit 1
  fi
  install -m 0755 "$src" "/usr/local/bin/$name"
}
