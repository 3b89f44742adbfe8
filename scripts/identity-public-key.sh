#!/usr/bin/env bash
# Prints the Restate request-identity public key (publickeyv1_<base58>) of an
# Ed25519 private key in PEM, for payment-service's --identity-keys / IDENTITY_KEYS.
#
# Usage: scripts/identity-public-key.sh PRIVATE_KEY.pem
#   make one with: openssl genpkey -algorithm ed25519 -out PRIVATE_KEY.pem
# Needs openssl and node (a prerequisite already, for the Restate server).
set -euo pipefail

if [[ $# -ne 1 || ! -f "$1" ]]; then
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

# The DER public key ends with the raw 32-byte key; base58 (Bitcoin alphabet) of it.
openssl pkey -in "$1" -pubout -outform DER | tail -c 32 | node -e '
const alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const chunks = [];
process.stdin.on("data", (c) => chunks.push(c));
process.stdin.on("end", () => {
  const bytes = Buffer.concat(chunks);
  let n = BigInt("0x" + bytes.toString("hex"));
  let out = "";
  while (n > 0n) { out = alphabet[Number(n % 58n)] + out; n /= 58n; }
  for (const b of bytes) { if (b !== 0) break; out = "1" + out; }
  console.log("publickeyv1_" + out);
});'
