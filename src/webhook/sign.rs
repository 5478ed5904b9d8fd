//! Signing a webhook body and checking a signature, as a receiver does.

use std::time::Duration;

use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header carrying the timestamp and signature.
pub const SIGNATURE_HEADER: &str = "Ratepool-Signature";

/// Why a signature header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header is malformed: {0}")]
    Malformed(&'static str),
    /// Outside the tolerance either way: an old request replayed, or a clock
    /// far off. A fresh timestamp is signed on every attempt, so retries pass.
    #[error("signature timestamp {timestamp} is more than {tolerance_secs}s away from now ({now})")]
    Stale { timestamp: u64, now: u64, tolerance_secs: u64 },
    #[error("signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    // HMAC hashes keys longer than a block and pads shorter ones, so
    // new_from_slice cannot fail; the trait just has one signature for all MACs.
    #[allow(clippy::expect_used)]
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Ratepool-Signature` header value for `body` sent at `timestamp`
/// (Unix seconds): `t={timestamp},v1={hex}`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a `Ratepool-Signature` header against the raw body, as a receiver
/// does. `now` is Unix seconds; timestamps further than `tolerance` from it
/// either way are refused so a captured request cannot be replayed later.
/// Several `v1=` entries are accepted (any may match) so a sender can sign
/// with an old and a new secret while one is rotated; unknown keys are
/// ignored for later schemes.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: u64, tolerance: Duration) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(VerifyError::Malformed("expected key=value pairs"))?;
        match key {
            "t" => {
                let t = value.parse::<u64>().map_err(|_| VerifyError::Malformed("t is not a Unix timestamp"))?;
                timestamp = Some(t);
            }
            "v1" => candidates.push(hex::decode(value).map_err(|_| VerifyError::Malformed("v1 is not hex"))?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed("no t="))?;
    if candidates.is_empty() {
        return Err(VerifyError::Malformed("no v1="));
    }
    if timestamp.abs_diff(now) > tolerance.as_secs() {
        return Err(VerifyError::Stale { timestamp, now, tolerance_secs: tolerance.as_secs() });
    }
    let expected = mac(secret, timestamp, body);
    // verify_slice compares in constant time, so timing does not reveal how
    // many leading bytes of a forged tag were right.
    if candidates.iter().any(|c| expected.clone().verify_slice(c).is_ok()) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::testutil::{SECRET, TOLERANCE};

    #[test]
    fn sign_verify_round_trip() {
        let body = br#"{"id":"job-1"}"#;
        let header = sign(SECRET.as_bytes(), 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_700_000_000, TOLERANCE), Ok(()));
        // Within the tolerance either way.
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_700_000_300, TOLERANCE), Ok(()));
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_699_999_700, TOLERANCE), Ok(()));
        // Order of the pairs, extra keys and a second (rotated) v1 do not matter.
        let v1 = header.split_once(",v1=").unwrap().1;
        let reordered = format!("v0=abc, v1={}, v1={v1}, t=1700000000", "00".repeat(32));
        assert_eq!(verify(SECRET.as_bytes(), &reordered, body, 1_700_000_000, TOLERANCE), Ok(()));
    }

    #[test]
    fn verify_rejects_tampering_and_bad_headers() {
        let body = br#"{"id":"job-1","status":"succeeded"}"#;
        let t = 1_700_000_000;
        let header = sign(SECRET.as_bytes(), t, body);
        let tampered = br#"{"id":"job-1","status":"failed"}"#;
        assert_eq!(verify(SECRET.as_bytes(), &header, tampered, t, TOLERANCE), Err(VerifyError::Mismatch));
        assert_eq!(verify(b"other", &header, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        // The timestamp is signed too: moving it breaks the signature.
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert_eq!(verify(SECRET.as_bytes(), &moved, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        let truncated = &header[..header.len() - 2];
        assert_eq!(verify(SECRET.as_bytes(), truncated, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        for bad in ["", "t=1700000000", "v1=00", "t=abc,v1=00", "t=1700000000,v1=zz", "garbage"] {
            assert!(
                matches!(verify(SECRET.as_bytes(), bad, body, t, TOLERANCE), Err(VerifyError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn verify_rejects_old_and_future_timestamps() {
        let body = b"{}";
        let header = sign(SECRET.as_bytes(), 1_700_000_000, body);
        let stale = verify(SECRET.as_bytes(), &header, body, 1_700_000_301, TOLERANCE);
        assert_eq!(
            stale,
            Err(VerifyError::Stale { timestamp: 1_700_000_000, now: 1_700_000_301, tolerance_secs: 300 })
        );
        assert!(matches!(
            verify(SECRET.as_bytes(), &header, body, 1_699_999_699, TOLERANCE),
            Err(VerifyError::Stale { .. })
        ));
    }

    #[test]
    fn sign_matches_an_independent_hmac() {
        // Computed with Python's standard library, not with this crate:
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test",
        //   b"1700000000.{\"id\":\"job-1\",\"status\":\"succeeded\"}", hashlib.sha256).hexdigest())'
        let expected = "d41f3e9ebfd7ec624e57532a3c8d774a9067c43b2f43357753a04ca744a610a1";
        let header = sign(SECRET.as_bytes(), 1_700_000_000, br#"{"id":"job-1","status":"succeeded"}"#);
        assert_eq!(header, format!("t=1700000000,v1={expected}"));
    }
}
