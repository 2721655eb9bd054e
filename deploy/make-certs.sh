#!/usr/bin/env bash
# Create the coordinator's TLS material for a fed-ecg federation (run once, on the coordinator).
#
#   deploy/make-certs.sh [--out DIR] [--host NAME_OR_IP]... [--days N]
#
# Writes into DIR (default: deploy/certs):
#   ca.crt, ca.key               private certificate authority (ca.key never leaves the coordinator;
#                                 ca.crt goes to every site)
#   superlink.crt, superlink.key TLS certificate of the SuperLink; SANs: localhost, 127.0.0.1, ::1,
#                                 and every --host given (e.g. the coordinator's DNS name or IP)
# Site keys are NOT made here: each site creates its own key pair on its own machine
# (deploy/make-site-key.sh SITE) and sends only SITE.key.pub; the coordinator registers it with
# `flwr supernode register SITE.key.pub <connection> --name SITE`. No private key travels.
# Existing files are never overwritten: delete DIR (or the file) to rotate.
set -euo pipefail

out="$(dirname "$0")/certs"
days=825
hosts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --sites) echo "make-certs.sh: --sites is gone: each site makes its own key with deploy/make-site-key.sh SITE" >&2; exit 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "make-certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make-certs.sh: '$tool' not found on PATH" >&2; exit 1; }
done

mkdir -p "$out"
chmod 700 "$out"
cd "$out"

# Subject alternative names: always the loopback names (the SuperLink's own SuperExec connects
# to it locally over TLS), then every --host.
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in "${hosts[@]+"${hosts[@]}"}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done

if [[ ! -f ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -days "$days" -subj "/CN=fed-ecg federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
  chmod 600 ca.key
  echo "created $out/ca.crt (CA certificate: give to every site) and ca.key (keep secret)"
fi

if [[ ! -f superlink.key ]]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -subj "/CN=fed-ecg superlink" -keyout superlink.key -out superlink.csr 2>/dev/null
  cat > superlink.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
  openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha384 \
    -days "$days" -extfile superlink.ext -out superlink.crt 2>/dev/null
  rm -f superlink.csr superlink.ext
  chmod 600 superlink.key
  echo "created $out/superlink.crt (SANs: $san) and superlink.key"
fi

echo
echo "Give ca.crt to every site. Each site runs deploy/make-site-key.sh <site> on its own machine"
echo "and sends you <site>.key.pub (never the .key). Register each one under its site name:"
echo "  flwr supernode register <site>.key.pub <connection> --name <site>"
