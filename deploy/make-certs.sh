#!/usr/bin/env bash
# Create the key material for a fed-ecg federation (run once, on the coordinator's machine).
#
#   deploy/make-certs.sh [--out DIR] [--host NAME_OR_IP]... [--sites "ptb ptbxl mimic cinc"] [--days N]
#
# Writes into DIR (default: deploy/certs):
#   ca.crt, ca.key               private certificate authority (ca.key never leaves the coordinator)
#   superlink.crt, superlink.key TLS certificate of the SuperLink; SANs: localhost, 127.0.0.1, ::1,
#                                 and every --host given (e.g. the coordinator's DNS name or IP)
#   sites/<site>.key, .key.pub   one ECDSA P-384 key pair per site for SuperNode authentication
#                                 (Flower rejects ed25519 for this). Each .key goes to its site only;
#                                 the .pub files are registered with `flwr supernode register`.
# Existing files are never overwritten: delete DIR (or the file) to rotate.
set -euo pipefail

out="$(dirname "$0")/certs"
days=825
sites="ptb ptbxl mimic cinc"
hosts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "make-certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make-certs.sh: '$tool' not found on PATH" >&2; exit 1; }
done

mkdir -p "$out/sites"
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

for site in $sites; do
  if [[ ! "$site" =~ ^[a-z0-9_-]+$ ]]; then
    echo "make-certs.sh: bad site name '$site'" >&2; exit 2
  fi
  if [[ ! -f "sites/$site.key" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fed-ecg site $site" -f "sites/$site.key"
    echo "created $out/sites/$site.key (give to site $site only) and $site.key.pub (register it)"
  fi
done

echo
echo "Register each site's public key with the SuperLink (from the coordinator, after it started):"
for site in $sites; do
  echo "  flwr supernode register $out/sites/$site.key.pub <connection>"
done
