#!/usr/bin/env bash
# Create this site's SuperNode key pair (run once, on the site's own machine).
#
#   deploy/make-site-key.sh SITE [--out DIR]
#
# Writes DIR/SITE.key (private, mode 600: it never leaves this machine) and DIR/SITE.key.pub
# (send it to the coordinator, who registers it with
# `flwr supernode register SITE.key.pub <connection> --name SITE`). ECDSA P-384: Flower rejects
# ed25519 for SuperNode authentication. Default DIR: deploy/keys. An existing key is never
# overwritten: delete it to rotate (and ask the coordinator to register the new .pub).
set -euo pipefail

site=""
out="$(dirname "$0")/keys"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "make-site-key.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    *) [[ -z "$site" ]] || { echo "make-site-key.sh: one SITE only" >&2; exit 2; }; site="$1"; shift ;;
  esac
done
if [[ ! "$site" =~ ^[a-z0-9_-]+$ ]]; then
  echo "make-site-key.sh: give the site name (e.g. ptbxl), got '${site}'" >&2; exit 2
fi
command -v ssh-keygen >/dev/null || { echo "make-site-key.sh: 'ssh-keygen' not found on PATH" >&2; exit 1; }

mkdir -p "$out"
chmod 700 "$out"
if [[ ! -f "$out/$site.key" ]]; then
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fed-ecg site $site" -f "$out/$site.key"
  chmod 600 "$out/$site.key"
  echo "created $out/$site.key (private: stays on this machine)"
fi
echo "send $out/$site.key.pub to the coordinator; they register it with:"
echo "  flwr supernode register $site.key.pub <connection> --name $site"
