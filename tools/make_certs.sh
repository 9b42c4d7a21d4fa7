#!/usr/bin/env bash
# Make a local certificate authority, a SuperLink TLS certificate signed by it, and
# (optionally) SuperNode authentication key pairs, all in one directory.
#
#   tools/make_certs.sh DIR [NODES]
#
# DIR/ca.crt            CA certificate: give it to SuperNodes (--root-certificates) and to
#                       `flwr`/server.py (root-certificates / --root-certificates)
# DIR/ca.key            CA private key: keep it offline; it can sign any certificate
# DIR/server.pem        SuperLink certificate (--ssl-certfile), SAN: IP 127.0.0.1, DNS
#                       localhost, plus $EXTRA_SAN (e.g. EXTRA_SAN="DNS:link.example,IP:10.0.0.5")
# DIR/server.key        SuperLink private key (--ssl-keyfile)
# DIR/node_<i>, DIR/node_<i>.pub   for i < NODES (default 0): ECDSA P-384 key pairs in
#                       OpenSSH format; register each .pub with `flwr supernode register`,
#                       start each SuperNode with --auth-supernode-private-key DIR/node_<i>
#
# Private keys are created owner-only (umask 077). Existing files are never overwritten:
# the script refuses if DIR already holds any of them.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 DIR [NODES]" >&2
    exit 2
fi
dir=$1
nodes=${2:-0}
days=${DAYS:-365}
if ! [[ $nodes =~ ^[0-9]+$ ]]; then
    echo "$0: NODES must be a non-negative integer, got '$nodes'" >&2
    exit 2
fi
for tool in openssl ssh-keygen; do
    if [[ $tool == ssh-keygen && $nodes -eq 0 ]]; then continue; fi
    command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 1; }
done

umask 077
mkdir -p "$dir"
for f in ca.key ca.crt server.key server.pem; do
    if [[ -e $dir/$f ]]; then
        echo "$0: $dir/$f exists; refusing to overwrite (use a fresh directory)" >&2
        exit 1
    fi
done

san="IP:127.0.0.1,DNS:localhost${EXTRA_SAN:+,$EXTRA_SAN}"

# The CA: a self-signed certificate allowed to sign others (and nothing else).
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
    -subj "/CN=precode-flower local CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt"

# The SuperLink's key and a certificate for its addresses (gRPC checks the SAN, not the CN).
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/server.key"
openssl req -new -key "$dir/server.key" -subj "/CN=localhost" -out "$dir/server.csr"
cat > "$dir/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -sha256 -days "$days" -extfile "$dir/server.ext" -out "$dir/server.pem" \
    2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
# Certificates are public; private keys stay 0600.
chmod 644 "$dir/ca.crt" "$dir/server.pem"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem" >/dev/null

for ((i = 0; i < nodes; i++)); do
    key="$dir/node_$i"
    if [[ -e $key ]]; then
        echo "$0: $key exists; refusing to overwrite" >&2
        exit 1
    fi
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "precode-flower node $i" -f "$key"
done

echo "CA:        $dir/ca.crt"
echo "SuperLink: $dir/server.pem $dir/server.key (SAN $san)"
if ((nodes > 0)); then
    echo "SuperNode keys: $dir/node_{0..$((nodes - 1))}(.pub)"
fi
