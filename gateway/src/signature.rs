//! Webhook signatures: lowercase hex HMAC-SHA256 of the raw body, keyed with the webhook's
//! secret (Plane `X-Plane-Signature`, Gitea `X-Gitea-Signature`). The comparison runs in
//! constant time: the header is decoded to bytes and checked by `hmac`'s `verify_slice`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was refused; the text is the short reason in the 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature")]
    Missing,
    #[error("malformed signature: expected 64 hex digits")]
    Malformed,
    #[error("wrong signature")]
    Wrong,
    #[error("webhook secret is not configured on the gateway")]
    NoSecret,
}

/// Returns the lowercase hex HMAC-SHA256 of `body` keyed with `secret` (what a sender puts
/// in the header).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Checks `header` (the signature header's value, if any) against `body`.
///
/// - `secret` set: the header must be present and right, whatever `allow_unsigned` says.
/// - `secret` unset: refused, unless `allow_unsigned` (local development).
/// - `allow_unsigned` with a secret: a missing header passes; a present one is checked.
pub fn verify(
    secret: Option<&[u8]>,
    allow_unsigned: bool,
    header: Option<&[u8]>,
    body: &[u8],
) -> Result<(), SignatureError> {
    // Gitea sends the header empty when the hook has no secret: that is "missing".
    let header = header.map(<[u8]>::trim_ascii).filter(|h| !h.is_empty());
    let Some(secret) = secret else {
        return if allow_unsigned {
            Ok(())
        } else {
            Err(SignatureError::NoSecret)
        };
    };
    let Some(header) = header else {
        return if allow_unsigned {
            Ok(())
        } else {
            Err(SignatureError::Missing)
        };
    };
    // Tolerate the `sha256=` prefix of X-Hub-Signature-256 style headers.
    let header = header.strip_prefix(b"sha256=").unwrap_or(header);
    let expected = decode_hex32(header).ok_or(SignatureError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Wrong)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Decodes exactly 64 hex digits (either case) into 32 bytes.
fn decode_hex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"contract-test-secret";

    #[test]
    fn the_gitea_test_vector_matches() {
        let body = crate::testdata::sample("gitea-webhook-push.json");
        let sig = "807e921bbcaf02eb60a632ce8c1ef8946f2aba67c3b0f5a8ae9eac777db650e9";
        assert_eq!(sign(SECRET, &body), sig);
        assert_eq!(
            verify(Some(SECRET), false, Some(sig.as_bytes()), &body),
            Ok(())
        );
    }

    #[test]
    fn the_plane_test_vector_matches() {
        let body = crate::testdata::python_json_dumps(&crate::testdata::sample(
            "plane-webhook-issue-created.json",
        ));
        assert_eq!(
            body.len(),
            1747,
            "python json.dumps of the sample is 1747 bytes"
        );
        let sig = "e151b46fd730423eb4533f24ead55e813d1cc1aa1f0f734f5403d84250b304c3";
        assert_eq!(sign(SECRET, &body), sig);
        assert_eq!(
            verify(Some(SECRET), false, Some(sig.as_bytes()), &body),
            Ok(())
        );
    }

    /// (secret, allow_unsigned, header, expected)
    type Case<'a> = (
        Option<&'a [u8]>,
        bool,
        Option<&'a [u8]>,
        Result<(), SignatureError>,
    );

    #[test]
    fn verification_table() {
        let body = b"{\"a\":1}";
        let good = sign(SECRET, body);
        let upper = good.to_ascii_uppercase();
        let prefixed = format!("sha256={good}");
        let mut flipped = good.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let other_key = sign(b"other", body);
        use SignatureError::*;
        let cases: [Case<'_>; 13] = [
            (Some(SECRET), false, Some(good.as_bytes()), Ok(())),
            (Some(SECRET), false, Some(upper.as_bytes()), Ok(())),
            (Some(SECRET), false, Some(prefixed.as_bytes()), Ok(())),
            (Some(SECRET), false, None, Err(Missing)),
            (Some(SECRET), false, Some(b""), Err(Missing)),
            (Some(SECRET), false, Some(b"  "), Err(Missing)),
            (Some(SECRET), false, Some(&flipped), Err(Wrong)),
            (Some(SECRET), false, Some(other_key.as_bytes()), Err(Wrong)),
            (Some(SECRET), false, Some(b"zz"), Err(Malformed)),
            (Some(SECRET), true, None, Ok(())),
            (Some(SECRET), true, Some(&flipped), Err(Wrong)),
            (None, false, Some(good.as_bytes()), Err(NoSecret)),
            (None, true, None, Ok(())),
        ];
        for (i, (secret, allow, header, want)) in cases.into_iter().enumerate() {
            assert_eq!(verify(secret, allow, header, body), want, "case {i}");
        }
    }

    #[test]
    fn a_signature_of_another_body_is_wrong() {
        let sig = sign(SECRET, b"{}");
        assert_eq!(
            verify(Some(SECRET), false, Some(sig.as_bytes()), b"{} "),
            Err(SignatureError::Wrong)
        );
    }
}
