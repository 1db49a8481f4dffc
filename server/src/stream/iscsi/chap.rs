//! CHAP with MD5 (RFC 1994, RFC 7143 §12.1.3): the credentials a token holder logs in with,
//! and the check of an initiator's response.
//!
//! **Why derived credentials.** CHAP proves knowledge of a secret the target must also know in
//! clear, but the catalog keeps only the sha256 of each token. So a token's CHAP credentials
//! are derived from that hash, which both sides can compute — the client from its token, the
//! server from its catalog row:
//!
//! - name: `kagami-` and the first 16 hex digits of sha256(token) (finds the row; 64 bits of a
//!   hash of a 256-bit random secret tell nothing about it);
//! - secret: 32 hex digits (128 bits) of sha256("kagami iscsi chap" ‖ sha256(token)).
//!
//! The token itself never crosses the wire, and the CHAP secret grants no API access. Whoever
//! can read the catalog can compute every CHAP secret — but can read the packs beside it too,
//! so learns nothing new. Revoking the token revokes its CHAP credentials.

use md5::{Digest as _, Md5};
use sha2::Sha256;

/// The one CHAP algorithm there is in practice: MD5 (`CHAP_A=5`).
pub const ALGORITHM_MD5: &str = "5";
/// Bytes of challenge sent (RFC 7143 asks for at least as long as the response, 16).
pub const CHALLENGE_LEN: usize = 16;
const NAME_PREFIX: &str = "kagami-";
/// Bytes of the token hash a CHAP name carries.
const NAME_HASH_BYTES: usize = 8;

/// The CHAP name and secret of the token whose secret hashes (sha256) to `hash`.
pub fn credentials_for_hash(hash: &[u8]) -> (String, String) {
    let name = format!(
        "{NAME_PREFIX}{}",
        hex::encode(&hash[..NAME_HASH_BYTES.min(hash.len())])
    );
    let mut h = Sha256::new();
    h.update(b"kagami iscsi chap");
    h.update(hash);
    let secret = hex::encode(&h.finalize()[..16]);
    (name, secret)
}

/// The CHAP name and secret of `token` (what `kagami image export-iscsi` prints).
pub fn credentials(token: &str) -> (String, String) {
    credentials_for_hash(&crate::catalog::tenancy::hash_secret(token))
}

/// The token-hash prefix a CHAP name carries, if it is one of ours.
pub fn hash_prefix(name: &str) -> Option<Vec<u8>> {
    let hex_part = name.strip_prefix(NAME_PREFIX)?;
    if hex_part.len() != 2 * NAME_HASH_BYTES {
        return None;
    }
    hex::decode(hex_part).ok()
}

/// A fresh identifier and challenge.
pub fn challenge() -> std::io::Result<(u8, [u8; CHALLENGE_LEN])> {
    let mut bytes = [0u8; CHALLENGE_LEN + 1];
    getrandom::fill(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("no randomness: {e}")))?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge.copy_from_slice(&bytes[1..]);
    Ok((bytes[0], challenge))
}

/// A binary value as the protocol writes it: `0x` and hex digits.
pub fn encode(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// A binary value: `0x` hex, or `0b` base64 (RFC 7143 §6.1), at most 64 bytes here (an MD5
/// response is 16).
pub fn decode(value: &str) -> Option<Vec<u8>> {
    if value.len() > 2 + 2 * 64 {
        return None;
    }
    if let Some(h) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        return hex::decode(h).ok();
    }
    let b64 = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))?;
    base64(b64)
}

fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The expected response: MD5(identifier ‖ secret ‖ challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Whether `got` is the response of `secret` to (`id`, `challenge`), compared in constant time.
pub fn verify(id: u8, secret: &[u8], challenge: &[u8], got: &[u8]) -> bool {
    let want = response(id, secret, challenge);
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_chap_response() {
        // RFC 1321's test vector through the same function: MD5("abc").
        assert_eq!(
            hex::encode(response(b'a', b"b", b"c")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        let (id, c) = (7, [1u8; 16]);
        let r = response(id, b"secret", &c);
        assert!(verify(id, b"secret", &c, &r));
        assert!(!verify(id, b"secreT", &c, &r));
        assert!(!verify(id + 1, b"secret", &c, &r));
        assert!(!verify(id, b"secret", &c, &r[..15]));
    }

    #[test]
    fn credentials_come_from_the_token_hash() {
        let (name, secret) = credentials("kgm_abc");
        assert!(
            name.starts_with("kagami-") && name.len() == 7 + 16,
            "{name}"
        );
        assert_eq!(secret.len(), 32);
        let hash = crate::catalog::tenancy::hash_secret("kgm_abc");
        assert_eq!(hash_prefix(&name).as_deref(), Some(&hash[..8]));
        assert_eq!(credentials_for_hash(&hash), (name, secret.clone()));
        assert_ne!(credentials("kgm_abd").1, secret);
        assert_eq!(hash_prefix("kagami-12"), None);
        assert_eq!(hash_prefix("admin"), None);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode("0x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode("0bAP8Q"), Some(vec![0, 255, 16]));
        assert_eq!(decode("0xzz"), None);
        assert_eq!(decode("1234"), None);
        assert_eq!(decode(&format!("0x{}", "00".repeat(65))), None);
        assert_eq!(encode(&[0xab, 1]), "0xab01");
    }
}
